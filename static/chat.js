// The chat page: keeps the conversation, posts it to api/chat and shows the reply as it streams.
// A plain script, no build step, no dependencies. Its top-level functions are globals on purpose:
// the browser tests call readEvents() directly.
"use strict";

const conversation = document.getElementById("conversation");
const composer = document.getElementById("composer");
const messageInput = document.getElementById("prompt");
const sendButton = document.getElementById("send");
const stopButton = document.getElementById("stop");
const tokenRow = document.getElementById("token-row");
const tokenInput = document.getElementById("token");

// The whole conversation, sent with every request: the server keeps no state between requests.
const messages = [];
// The AbortController of the reply that is streaming, or null. Stop aborts the fetch, which closes
// the connection; the server notices on its next write and closes its upstream request.
let streaming = null;

// Only a server with CHAT_API_TOKEN set asks for a token (401). sessionStorage, not localStorage:
// the token lives as long as the tab, not on the disk.
tokenInput.value = sessionStorage.getItem("chat-token") || "";
tokenRow.hidden = !tokenInput.value;
tokenInput.addEventListener("input", () => sessionStorage.setItem("chat-token", tokenInput.value.trim()));

composer.addEventListener("submit", (event) => {
  event.preventDefault();
  send();
});
messageInput.addEventListener("keydown", (event) => {
  // Enter sends, Shift+Enter falls through to the textarea's new line. An Enter that confirms an
  // input method's composition (Korean, Japanese, Chinese) is not a send.
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    composer.requestSubmit();
  }
});
stopButton.addEventListener("click", () => streaming?.abort());

/** Send the conversation with the new message, and stream the reply into the page. */
async function send() {
  const text = messageInput.value;
  if (!text.trim() || streaming) return;
  const question = { role: "user", content: text };
  addMessage("user", text);
  const reply = addMessage("assistant", "");
  reply.item.dataset.state = "streaming";
  messageInput.value = "";
  setStreaming(new AbortController());

  const answer = await streamReply([...messages, question], reply, streaming.signal);

  // A turn joins the conversation once the model has said something, even when stopped or cut
  // short: that is what the person saw. Otherwise the message goes back in the box to send again.
  if (answer) messages.push(question, { role: "assistant", content: answer });
  else if (!messageInput.value) messageInput.value = text;
  setStreaming(null);
}

/** POST the conversation and show the reply as it arrives; return the text the model sent. */
async function streamReply(history, reply, signal) {
  let answer = "";
  let end = null;
  try {
    const response = await fetch("api/chat", {
      method: "POST",
      headers: requestHeaders(),
      body: JSON.stringify({ messages: history }),
      signal,
    });
    if (!response.ok) {
      finish(reply, "error", await describeHttpError(response));
      return answer;
    }
    for await (const data of readEvents(response.body)) {
      if (data === "[DONE]") {
        finish(reply, "done", describeEnd(end));
        return answer;
      }
      const event = JSON.parse(data); // the events are told apart by their keys
      if (event.error) {
        finish(reply, "error", event.error); // the server words it for a person
        return answer;
      }
      if (event.content) {
        answer += event.content;
        followTheEnd(() => reply.words.appendData(event.content));
      }
      if ("finish_reason" in event) end = event; // the end event; shown once [DONE] confirms it
    }
    finish(reply, "error", "The reply was cut off before it was complete.");
  } catch (error) {
    if (error.name === "AbortError") {
      finish(reply, "stopped", answer ? "Stopped." : "Stopped before the model answered.");
    } else if (error instanceof SyntaxError) {
      finish(reply, "error", "The server sent something this page cannot read.");
    } else {
      finish(reply, "error", "The connection to the server was lost. Please try again.");
    }
  }
  return answer;
}

/**
 * Yield the data of each Server-Sent Event in a fetch body, as text.
 *
 * EventSource cannot POST, so this is the spec's parser cut down to what the wire protocol uses
 * (https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation).
 * A read can end anywhere, inside a line or inside a UTF-8 character: the decoder keeps partial
 * characters and `buffer` the partial line. Lines end in \n or \r\n; a blank line ends an event;
 * lines starting with ":" are comments (": ok", ": ping") and are skipped.
 */
async function* readEvents(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let data = [];
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      const lines = buffer.split(/\r?\n/);
      buffer = lines.pop(); // the last piece has no line end yet: wait for the rest
      for (const line of lines) {
        if (line === "") {
          if (data.length) yield data.join("\n");
          data = [];
        } else if (line.startsWith("data:")) {
          data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
        } // anything else is a comment or a field this protocol does not use (event:, id:)
      }
    }
  } finally {
    reader.cancel().catch(() => {}); // leaving early (an error event, Stop) lets go of the body
  }
}

/** Turn an HTTP error that came before the stream into a sentence for a person. */
async function describeHttpError(response) {
  // The service answers {"error": {"message", "code"}}; a proxy in front of it may answer HTML.
  const body = await response.json().catch(() => null);
  const message = body?.error?.message;
  const seconds = retryAfterSeconds(response.headers.get("Retry-After"));
  const later = seconds
    ? `Please try again in ${seconds} second${seconds === 1 ? "" : "s"}.`
    : "Please try again shortly.";
  switch (response.status) {
    case 401:
      tokenRow.hidden = false;
      return tokenInput.value
        ? "The access token was not accepted. Check it below and send again."
        : "This chat needs an access token. Enter it below and send again.";
    case 413:
      return "The conversation is too long to send. Reload the page to start a new one.";
    case 429:
      return `The model is busy right now. ${later}`;
    case 503:
      return `The server is handling too many conversations right now. ${later}`;
  }
  if (message && response.status >= 500) return message; // 502, 504: the service words these for people
  if (message) return `The request was refused: ${message}`;
  return `The server answered with an error (HTTP ${response.status}). ${later}`;
}

/** Read Retry-After, seconds or an HTTP date (RFC 9110, section 10.2.3), as whole seconds, or null. */
function retryAfterSeconds(value) {
  if (!value) return null;
  const seconds = /^\s*\d+\s*$/.test(value) ? Number(value) : (Date.parse(value) - Date.now()) / 1000;
  return Number.isFinite(seconds) ? Math.max(1, Math.ceil(seconds)) : null;
}

/** Describe how a complete reply ended: why, if it was cut short, and the tokens it used. */
function describeEnd(end) {
  const reasons = {
    length: "Cut short: the reply reached the model's length limit.",
    content_filter: "Cut short by the model's content filter.",
  };
  const usage = end?.usage;
  const tokens = usage
    ? `${usage.total_tokens} tokens: ${usage.prompt_tokens} prompt, ${usage.completion_tokens} reply.`
    : "";
  return [reasons[end?.finish_reason], tokens].filter(Boolean).join(" ");
}

function requestHeaders() {
  const headers = { "Content-Type": "application/json" };
  if (tokenInput.value.trim()) headers.Authorization = `Bearer ${tokenInput.value.trim()}`;
  return headers;
}

/** Append a message to the conversation; return the Text node its words go into, and its note. */
function addMessage(role, content) {
  const item = document.createElement("li");
  item.className = `message ${role}`;
  const speaker = document.createElement("span");
  speaker.className = "visually-hidden"; // screen readers hear who speaks; the layout shows it
  speaker.textContent = role === "user" ? "You: " : "Assistant: ";
  const text = document.createElement("p");
  text.className = "text";
  // Model output is text, never markup: a Text node cannot turn into elements, whatever it holds.
  // appendData() then grows that one node, token by token.
  const words = text.appendChild(document.createTextNode(content));
  const note = document.createElement("p");
  note.className = "note";
  item.append(speaker, text, note);
  followTheEnd(() => conversation.append(item));
  return { item, words, note };
}

/** Mark a reply finished: its state (styles and tests read it) and a short note under it. */
function finish(reply, state, note) {
  reply.item.dataset.state = state;
  reply.note.textContent = note;
}

/** Make a change; if the page was scrolled to its end, keep it there, else leave the reader alone. */
function followTheEnd(change) {
  const page = document.documentElement;
  const atEnd = window.innerHeight + window.scrollY >= page.scrollHeight - 48;
  change();
  if (atEnd) window.scrollTo(0, page.scrollHeight);
}

/** Lock the input while a reply streams (`controller` set) and swap Send for Stop. */
function setStreaming(controller) {
  streaming = controller;
  const busy = controller !== null;
  messageInput.disabled = busy;
  sendButton.hidden = busy;
  stopButton.hidden = !busy;
  conversation.setAttribute("aria-busy", String(busy));
  (busy ? stopButton : messageInput).focus(); // the disabled box loses focus: Stop is a key away
}
