// @microsoft/fetch-event-source 2.0.1 with the consumer code of the README's "Use it from your front end".
// Usage: node fetch_event_source.mjs '{"url": ".../api/chat", "body": {...}, "stopAfter": 1}'
// Prints what it rebuilt as JSON. With stopAfter, it aborts after that many content events and
// stays alive a few seconds, so the test sees the abort (not the process exit) close the stream.
import { fetchEventSource } from '@microsoft/fetch-event-source';

// A browser library: fetchEventSource calls window.setTimeout and document.removeEventListener
// whatever its options, so Node needs these two names; nothing else is stood in for.
globalThis.window = globalThis;
globalThis.document = Object.assign(new EventTarget(), { hidden: false });

const { url, body, stopAfter } = JSON.parse(process.argv[2]);
const result = { reply: '', reasoning: '', end: null, error: null, done: false, requests: 0 };
const controller = new AbortController();
let contentEvents = 0;

try {
  await fetchEventSource(url, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify(body),
    signal: controller.signal,
    openWhenHidden: true, // by default a hidden tab closes the stream and sends the chat again
    async onopen(response) {
      result.requests += 1;
      if (!response.ok) throw new Error((await response.json()).error.message); // refused before the stream
    },
    onmessage(ev) {
      if (ev.data === '[DONE]') return void (result.done = true);
      const event = JSON.parse(ev.data); // every event is JSON with a `content`
      if (event.error) throw new Error(event.error);
      result.reply += event.content;
      result.reasoning += event.reasoning ?? '';
      if (event.finish_reason !== undefined) result.end = event;
      if (event.content && ++contentEvents === stopAfter) controller.abort();
    },
    onerror(err) {
      throw err; // no retry: each one would pay for a new completion
    },
  });
} catch (err) {
  result.error = err.message;
}
process.stdout.write(JSON.stringify(result) + '\n');
if (controller.signal.aborted) await new Promise((resolve) => setTimeout(resolve, 5000));
