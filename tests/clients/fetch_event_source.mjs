// @microsoft/fetch-event-source 2.0.1 with the consumer code of the README's "Use it from your front end".
// Usage: node fetch_event_source.mjs '{"url": ".../api/chat", "body": {...}, "stopAfter": 1, "hideAfter": 3}'
// Prints what it rebuilt as JSON. With stopAfter, it stops after that many content events (by the
// stop endpoint with "stop": "endpoint", else by aborting) and stays alive a few seconds, so the
// test sees the stop (not the process exit) close the stream. With hideAfter, the tab is hidden
// after that many content events and shown again 300 ms later.
import { fetchEventSource } from '@microsoft/fetch-event-source';
import { fetchKeepingCookies } from './keep_cookies.mjs';

// A browser library: fetchEventSource calls window.setTimeout and document.add/removeEventListener,
// and reads document.hidden when the tab's visibility changes. Node has neither window nor document:
// these two stand in, nothing else does. hide() does what a browser does when a tab is hidden or shown.
globalThis.window = globalThis;
globalThis.document = Object.assign(new EventTarget(), { hidden: false });
function setHidden(hidden) {
  document.hidden = hidden;
  document.dispatchEvent(new Event('visibilitychange'));
}

const { url, body, stopAfter, stop, hideAfter } = JSON.parse(process.argv[2]);
const result = { reply: '', reasoning: '', end: null, error: null, done: false, requests: 0, resumed: 0 };
const controller = new AbortController();
let contentEvents = 0;
let streamId = null;

class Refused extends Error {}
let lastEventId = null;

try {
  await fetchEventSource(url, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify(body),
    signal: controller.signal,
    fetch: fetchKeepingCookies,
    // openWhenHidden stays false: a hidden tab closes the stream, and when it is shown again the
    // same POST goes out with Last-Event-ID, which the service answers with the rest of that reply.
    async onopen(response) {
      result.requests += 1;
      if (lastEventId) result.resumed += 1;
      if (!response.ok) throw new Refused((await response.json()).error.message); // refused before the stream
      streamId = response.headers.get('X-Stream-Id');
    },
    onmessage(ev) {
      lastEventId = ev.id;
      if (ev.data === '[DONE]') return void (result.done = true);
      const event = JSON.parse(ev.data); // every event is JSON with a `content`
      if (event.error) throw new Refused(event.error);
      result.reply += event.content;
      result.reasoning += event.reasoning ?? '';
      if (event.finish_reason !== undefined) result.end = event;
      if (!event.content) return;
      contentEvents += 1;
      if (contentEvents === hideAfter) {
        setHidden(true);
        setTimeout(() => setHidden(false), 300);
      }
      if (contentEvents === stopAfter) {
        if (stop === 'endpoint') fetchKeepingCookies(new URL(`${streamId}/stop`, `${url}/`), { method: 'POST' });
        controller.abort();
      }
    },
    onclose() {
      if (!result.done) throw new Error('The stream ended before the reply did.'); // retried below
    },
    onerror(err) {
      // A retry goes out with Last-Event-ID, and resumes the same reply; without one (nothing
      // received yet) it would pay for a new completion, so it is not made.
      if (err instanceof Refused || !lastEventId) throw err;
    },
  });
} catch (err) {
  result.error = err.message;
}
process.stdout.write(JSON.stringify(result) + '\n');
if (controller.signal.aborted) await new Promise((resolve) => setTimeout(resolve, 5000));
