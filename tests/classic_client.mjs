// A classic browser client, as SSE tutorials write it: fetch + a ReadableStream reader that splits
// lines and appends the content of every `data:` line until [DONE]. Run by Node's fetch; prints
// the rebuilt reply as JSON. Usage: node classic_client.mjs http://127.0.0.1:8000/api/chat

const url = process.argv[2];
let reply = '';
function appendToChat(content) {
  reply += content;
}

async function sendMessage(messages) {
  const response = await fetch(url, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ messages }),
  });

  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = '';

  while (true) {
    const { done, value } = await reader.read();
    if (done) break;

    buffer += decoder.decode(value, { stream: true });
    const lines = buffer.split('\n');
    buffer = lines.pop() || '';

    for (const line of lines) {
      if (line.startsWith('data: ')) {
        const data = line.slice(6);
        if (data === '[DONE]') return;
        const { content } = JSON.parse(data);
        appendToChat(content);
      }
    }
  }
}

await sendMessage([{ role: 'user', content: 'Hi' }]);
process.stdout.write(JSON.stringify(reply));
