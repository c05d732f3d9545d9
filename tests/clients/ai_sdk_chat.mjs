// The AI SDK as useChat drives it: the Chat of @ai-sdk/react (what useChat makes and renders) with
// ai's DefaultChatTransport, in Node. React itself is not needed to stream: useChat only subscribes.
// Usage: node ai_sdk_chat.mjs '{"url": ".../api/ui-chat", "turns": [{"text": "Hi"}], "body": {...}, "stopAfter": 1}'
// Each turn is what sendMessage gets ({text, files}); `body` is the transport's extra body fields.
// Prints the chat's state after the last turn as JSON: status, error and messages, as useChat returns them.
// With stopAfter, it calls stop() once the reply has that many characters, and stays alive a few
// seconds, so the test sees the abort (not the process exit) close the stream.
import { Chat } from '@ai-sdk/react';
import { DefaultChatTransport } from 'ai';

const { url, turns, body, stopAfter } = JSON.parse(process.argv[2]);
const errors = [];
const chat = new Chat({
  transport: new DefaultChatTransport({ api: url, body }),
  onError: (error) => errors.push(error.message),
});

const replyText = () =>
  chat.messages
    .filter((message) => message.role === 'assistant')
    .flatMap((message) => message.parts)
    .filter((part) => part.type === 'text')
    .map((part) => part.text)
    .join('');

for (const turn of turns) {
  let settled = false;
  const sent = chat.sendMessage(turn).finally(() => (settled = true));
  if (stopAfter) {
    while (replyText().length < stopAfter && !settled) await new Promise((resolve) => setTimeout(resolve, 5));
    await chat.stop();
  }
  await sent;
}
const { status, messages, error } = chat;
process.stdout.write(JSON.stringify({ status, error: error?.message ?? null, errors, messages }) + '\n');
if (stopAfter) await new Promise((resolve) => setTimeout(resolve, 5000));
