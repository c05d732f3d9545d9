// The AI SDK as useChat drives it: the Chat of @ai-sdk/react (what useChat makes and renders) with
// ai's DefaultChatTransport, in Node. React itself is not needed to stream: useChat only subscribes.
// Usage: node ai_sdk_chat.mjs '{"url": ".../api/ui-chat", "turns": [{"text": "Hi"}], "body": {...}, "stopAfter": 1}'
// Each turn is what sendMessage gets ({text, files}); `body` is the transport's extra body fields.
// Prints the chat's state after the last turn as JSON: status, error and messages, as useChat returns them.
// With stopAfter, it stops once the reply has that many characters (with "stop": "endpoint", the
// README's way: POST <url>/<chat id>/stop, then stop()), and stays alive a few seconds, so the test
// sees the stop (not the process exit) close the stream.
// With "resume": true, a turn cut off by the network is resumed as after a reload with
// useChat({ id, messages, resume: true }): a new Chat with the same id and the messages saved before
// the reply, and resumeStream(), which useChat calls when it mounts. `cut` holds the state at the cut.
import { Chat } from '@ai-sdk/react';
import { DefaultChatTransport } from 'ai';
import { fetchKeepingCookies } from './keep_cookies.mjs';

const { url, turns, body, stopAfter, stop, resume, id } = JSON.parse(process.argv[2]);
const errors = [];
const transport = new DefaultChatTransport({ api: url, body, fetch: fetchKeepingCookies });
const onError = (error) => errors.push(error.message);
let chat = new Chat({ id, transport, onError });

const replyText = () =>
  chat.messages
    .filter((message) => message.role === 'assistant')
    .flatMap((message) => message.parts)
    .filter((part) => part.type === 'text')
    .map((part) => part.text)
    .join('');
const state = ({ status, messages, error }) => ({ status, error: error?.message ?? null, messages });

let cut = null;
for (const turn of turns) {
  let settled = false;
  const saved = chat.messages; // what an app keeps of a conversation: the turns before this reply
  const sent = chat.sendMessage(turn).finally(() => (settled = true));
  if (stopAfter) {
    while (replyText().length < stopAfter && !settled) await new Promise((resolve) => setTimeout(resolve, 5));
    if (stop === 'endpoint') await fetchKeepingCookies(`${url}/${encodeURIComponent(chat.id)}/stop`, { method: 'POST' });
    await chat.stop();
  }
  await sent;
  if (resume && chat.status === 'error') {
    cut = state(chat);
    const asked = chat.messages.slice(0, saved.length + 1); // the question joined them when it was sent
    chat = new Chat({ id: chat.id, messages: asked, transport, onError });
    await chat.resumeStream();
  }
}
process.stdout.write(JSON.stringify({ ...state(chat), errors, cut }) + '\n');
if (stopAfter) await new Promise((resolve) => setTimeout(resolve, 5000));
