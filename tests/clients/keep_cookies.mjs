// Node's fetch keeps no cookies. Without CHAT_API_TOKEN the service binds a stream to the cookie it
// sets on the POST that started it (a browser sends it back by itself): keep it, and send it back.
// The README's "Use it from your front end" shows the same lines (a test holds them to it).
let cookie = '';

export async function fetchKeepingCookies(url, init = {}) {
  const headers = new Headers(init.headers);
  if (cookie) headers.set('Cookie', cookie);
  const response = await fetch(url, { ...init, headers });
  const set = response.headers.getSetCookie().map((line) => line.split(';')[0]);
  if (set.length) cookie = set.join('; ');
  return response;
}
