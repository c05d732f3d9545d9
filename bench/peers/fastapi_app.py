"""The Express peer's logic in the usual async Python pick: FastAPI + sse-starlette + AsyncOpenAI.

    uvicorn fastapi_app:app --app-dir bench/peers --port 8001

As the Express peer does: read `messages`, open the stream with `stream=True`, send `data: {"content": ...}`
per non-empty delta and `data: [DONE]` at the end, or `data: {"error": ...}` on failure. The SDK
reads OPENAI_API_KEY and OPENAI_BASE_URL from the environment.
"""

import json

from fastapi import FastAPI, Request
from openai import AsyncOpenAI
from sse_starlette import EventSourceResponse

app = FastAPI()
client = AsyncOpenAI()


@app.post("/api/chat")
async def chat(request: Request):
    messages = (await request.json())["messages"]

    async def events():
        try:
            stream = await client.chat.completions.create(model="gpt-4", messages=messages, stream=True)
            async for chunk in stream:
                content = (chunk.choices[0].delta.content if chunk.choices else "") or ""
                if content:
                    yield {"data": json.dumps({"content": content})}
            yield {"data": "[DONE]"}
        except Exception as exc:  # the Express peer's catch: the error goes into the stream
            yield {"data": json.dumps({"error": str(exc)})}

    return EventSourceResponse(events())
