"""A scripted OpenAI-compatible endpoint for end-to-end tests: the statuses it answers
are the test's to choose, request by request."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from aiohttp import web


class ScriptedAPI:
    """A chat-completions endpoint on 127.0.0.1 that answers from a script of statuses,
    then 200s (or `down_status` while `down`); served from its own thread and loop, as
    the daemon under test is a subprocess."""

    def __init__(
        self, script: list[int] | None = None, *, content: str = "ok", down_status: int = 500
    ) -> None:
        self.script = list(script or [])
        self.down = False
        self.down_status = down_status
        self.delay_s = 0.0
        self.content = content
        self.statuses: list[int] = []
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True)

    async def _chat(self, request: web.Request) -> web.Response:
        status = self.script.pop(0) if self.script else (self.down_status if self.down else 200)
        if status == 200 and self.delay_s:
            await asyncio.sleep(self.delay_s)
        self.statuses.append(status)
        if status == 200:
            return web.json_response(
                {
                    "choices": [{"message": {"role": "assistant", "content": self.content}}],
                    "usage": {"prompt_tokens": 7, "completion_tokens": 5},
                }
            )
        headers = {"retry-after-ms": "50"} if status == 429 else {}
        return web.json_response(
            {"error": {"message": f"scripted {status}", "code": None}},
            status=status,
            headers=headers,
        )

    def _serve(self) -> None:
        async def main() -> None:
            app = web.Application()
            app.router.add_post("/v1/chat/completions", self._chat)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
            self._stop = asyncio.Event()
            self._ready.set()
            try:
                await self._stop.wait()
            finally:
                await runner.cleanup()

        self._loop.run_until_complete(main())
        self._loop.close()

    def __enter__(self) -> ScriptedAPI:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *_: Any) -> None:
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
