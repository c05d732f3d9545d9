// eventsource-parser 4.1.3 fed from fetch, as its README shows.
// Usage: node eventsource_parser.mjs '{"url": ".../api/chat", "body": {...}, "stopAfter": 1}'
// Prints what it rebuilt as JSON. With stopAfter, it aborts after that many content events and
// stays alive a few seconds, so the test sees the abort (not the process exit) close the stream.
import { createParser } from 'eventsource-parser';

const { url, body, stopAfter } = JSON.parse(process.argv[2]);
const result = { reply: '', reasoning: '', end: null, error: null, done: false };
const controller = new AbortController();
let contentEvents = 0;

const parser = createParser({
  onEvent(event) {
    if (event.data === '[DONE]') {
      result.done = true;
      return;
    }
    const data = JSON.parse(event.data);
    result.reply += data.content;
    result.reasoning += data.reasoning ?? '';
    if (data.finish_reason !== undefined) result.end = data;
    if (data.error) result.error = data.error;
    if (data.content && ++contentEvents === stopAfter) controller.abort();
  },
});

try {
  const response = await fetch(url, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify(body),
    signal: controller.signal,
  });
  if (!response.ok) throw new Error((await response.json()).error.message);
  for await (const text of response.body.pipeThrough(new TextDecoderStream())) parser.feed(text);
} catch (err) {
  if (!controller.signal.aborted) result.error = err.message;
}
process.stdout.write(JSON.stringify(result) + '\n');
if (controller.signal.aborted) await new Promise((resolve) => setTimeout(resolve, 5000));
