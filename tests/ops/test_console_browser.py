"""The console in a real browser: headless Chromium (Debian's ``chromium``, driven by Playwright
through ``executable_path``) against a real sidecar with its token and a real worker.

What the page shows is compared with what Redis holds, a change in the queue must show within
1 s, a dead letter is requeued by a click and its task then runs, and a task's tokens arrive on
its page while it runs. ``SOP_CONSOLE_SCREENSHOTS=docs/img`` writes the screenshots the docs
show (otherwise they go to the test's temporary folder).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.async_api import Page, async_playwright, expect
from pydantic import SecretStr
from redis.asyncio import Redis

from sop_llm.gpu.nvml import VramMonitor
from sop_llm.gpu.semaphore import Device, GpuSemaphore, SemaphoreConfig
from sop_llm.ops.gpu_setup import GpuRuntime, device_keys
from sop_llm.ops.sidecar import Sidecar
from sop_llm.providers.echo import EchoProvider
from sop_llm.providers.registry import ModelRegistry
from sop_llm.streams.keys import TASK_GROUP, Keys
from sop_llm.streams.producer import Producer, ProducerConfig
from tests.conftest import wait_for
from tests.gpu.fakes import GIB, FakeGpu
from tests.harness import echo_registry, running_worker, stream_entries
from tests.ops.apicheck import settings_for

TOKEN = "console-t0ken"
CHROMIUM = os.environ.get("SOP_CHROMIUM") or next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None
)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"),
    reason="no chromium on PATH (apt-get install chromium; .ci/run installs it)",
)


@dataclass
class Console:
    base: str
    keys: Keys
    client: Redis
    registry: ModelRegistry
    producer: Producer
    shots: Path
    semaphore: GpuSemaphore


@pytest.fixture
async def console(
    client: Redis, redis_url: str, namespace: str, tmp_path: Path
) -> AsyncIterator[Console]:
    keys = Keys(namespace)
    # the sidecar shows a second pool, "batch", that no worker serves: its tasks wait there
    settings = settings_for(
        redis_url, namespace, sidecar_token=SecretStr(TOKEN), pools=("default", "batch")
    )
    registry = echo_registry(tokens_per_s=20)
    # a device's memory as a fake reader reports it, its semaphore a real one in Redis
    semaphore = GpuSemaphore(
        client=client, keys=device_keys(keys, "host-a", 0), device=Device("host-a", 0),
        config=SemaphoreConfig(permits=2, lease_ms=30_000, poll_s=0.05),
    )  # fmt: skip
    gpu = GpuRuntime(
        monitor=VramMonitor(reader=FakeGpu(total=[24 * GIB], others=[6 * GIB])),
        semaphores={0: semaphore},
    )
    side = Sidecar(client=client, settings=settings, with_worker=False, gpu=gpu)
    shots = Path(os.environ.get("SOP_CONSOLE_SCREENSHOTS") or tmp_path)
    async with (
        side.running(),
        running_worker(
            client, keys, registry=registry, unknown_model_grace_s=0.0, shutdown_grace_s=0.5
        ),
    ):
        producer = Producer(ProducerConfig(namespace=namespace, pool="default"), client=client)
        base = f"http://127.0.0.1:{side.port}"
        yield Console(base, keys, client, registry, producer, shots, semaphore)


@pytest.fixture
async def page() -> AsyncIterator[Page]:
    assert CHROMIUM is not None, "CI runs the browser tests: install chromium"
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            context = await browser.new_context(viewport={"width": 1400, "height": 900})
            yield await context.new_page()
        finally:
            await browser.close()


async def _sign_in(page: Page, base: str, path: str = "/") -> None:
    """Open ``path``; the page asks for the token; a wrong one is refused, the right one kept."""
    await page.goto(base + path)
    await expect(page.locator("#login")).to_be_visible()
    await page.fill("#token", "wrong")
    await page.click("#login-submit")
    await expect(page.locator("#login-refused")).to_be_visible()
    await page.fill("#token", TOKEN)
    await page.click("#login-submit")
    await expect(page.locator("#login")).to_be_hidden()


def _cell(stream: str, field: str) -> str:
    return f'#queues tr[data-stream="{stream}"] td[data-field="{field}"]'


async def test_the_figures_are_redis_and_a_change_shows_within_1_s(
    console: Console, page: Page
) -> None:
    keys, client = console.keys, console.client
    waiting = keys.tasks("batch", "normal")
    for i in range(3):
        await console.producer.submit("echo", f"batch {i}", pool="batch")
    await client.xgroup_create(waiting, TASK_GROUP, id="0")
    await client.xreadgroup(TASK_GROUP, "elsewhere", {waiting: ">"}, count=1)
    running = await console.producer.submit("echo", "a b c", max_tokens=200, stream=True)

    async with console.semaphore.slot(priority=0, holder_id="w1:t-on-gpu", timeout=5):
        await _sign_in(page, console.base)
        await expect(page.locator(_cell(waiting, "length"))).to_have_text("3")
        device = page.locator("#gpu-devices tbody tr")
        await expect(device.locator('td[data-field="name"]')).to_have_text("Fake GPU")
        await expect(device.locator('td[data-field="total"]')).to_have_text("24.0 GiB")
        await expect(device).to_contain_text("6.0 GiB")  # used
        await expect(page.locator('td[data-field="holder"]')).to_contain_text("w1:t-on-gpu")
        await expect(page.locator("#gpu-box")).to_contain_text("1 of 2 permits held")
        await _queue_figures(console, page, waiting, running)
    started = time.monotonic()
    await console.producer.submit("echo", "one more", pool="batch")
    await expect(page.locator(_cell(waiting, "length"))).to_have_text("4", timeout=2000)
    took = time.monotonic() - started
    assert took < 1.0, f"the console showed the new task after {took:.2f} s"
    assert await page.inner_text(_cell(waiting, "lag")) == "3"
    await console.producer.cancel(running)


async def test_a_dead_letter_is_requeued_by_a_click(console: Console, page: Page) -> None:
    keys, client = console.keys, console.client
    task_id = await console.producer.submit("later", "x y", max_tokens=2)  # no such model yet
    await wait_for(lambda: client.xlen(keys.dead), 10)
    [dead] = await stream_entries(client, keys.dead)

    await _sign_in(page, console.base, "/#/dead")
    row = page.locator(f'#dead tr[data-task="{task_id}"]')
    await expect(row.locator('td[data-field="reason"]')).to_have_text("model_not_found")
    await expect(row.locator('td[data-field="model"]')).to_have_text("later")
    await page.screenshot(path=console.shots / "console-dead-letters.png", full_page=True)

    console.registry.register("later", EchoProvider())  # the model is deployed
    await row.locator("button.requeue").click()
    await expect(page.locator("#dead-notice")).to_contain_text(f"requeued {task_id}")
    assert await client.xrange(keys.dead, dead.entry_id, dead.entry_id) == []
    result = await console.producer.wait(task_id, timeout=10)
    assert result.state == "completed" and result.text == "x y"
    await expect(page.locator("#dead tr.empty")).to_have_count(1)


async def test_a_tasks_tokens_arrive_on_its_page(console: Console, page: Page) -> None:
    await _sign_in(page, console.base, "/#/submit")
    await page.fill('#submit-form [name="prompt"]', "tokens arrive as they are made")
    await page.fill('#submit-form [name="max_tokens"]', "40")  # 2 s at 20 tokens a second
    await page.click("#submit-task")
    await page.wait_for_url("**/#/task/*")
    task_id = page.url.rsplit("/", 1)[1]
    tokens = page.locator("#tokens")
    # some text while the task still runs (no end event yet), then all of it
    await expect(tokens).to_contain_text("tokens arrive")
    assert await tokens.get_attribute("data-ended") is None
    await expect(page.locator("#task-state")).to_have_text("running")
    await page.screenshot(path=console.shots / "console-task.png", full_page=True)
    await expect(tokens).to_have_attribute("data-ended", "completed", timeout=10_000)
    result = await console.producer.wait(task_id, timeout=10)
    assert await tokens.inner_text() == result.text
    assert result.usage is not None and result.usage.output_tokens == 40
    await expect(page.locator("#task-state")).to_have_text("completed")


async def _queue_figures(console: Console, page: Page, waiting: str, running: str) -> None:
    """The figures shown for ``waiting`` are what XINFO says; the worker, its held task and the
    counters are there."""
    keys, client = console.keys, console.client
    [group] = await client.xinfo_groups(waiting)
    assert int(await page.inner_text(_cell(waiting, "lag"))) == group["lag"] == 2
    assert int(await page.inner_text(_cell(waiting, "pending"))) == group["pending"] == 1
    assert await page.inner_text(_cell(waiting, "consumers")) == "1"
    assert (await page.inner_text(_cell(waiting, "oldest-waiting"))).endswith("s")
    await expect(
        page.locator('#workers tr[data-consumer="w1"] td[data-field="models"]')
    ).to_have_text("echo")
    # in flight: the running task on w1, and the batch entry the other consumer holds
    await expect(page.locator("#inflight tr[data-task]")).to_have_count(2)
    mine = page.locator(f'#inflight tr[data-task="{running}"]')
    await expect(mine.locator('td[data-field="state"]')).to_have_text("running")
    await expect(mine.locator('td[data-field="consumer"]')).to_have_text("w1")
    held = page.locator('#workers tr[data-consumer="w1"] td[data-field="held"]')
    await expect(held).to_have_text("1")
    assert await page.inner_text('[data-field="dead-count"]') == str(await client.xlen(keys.dead))
    await page.screenshot(path=console.shots / "console-overview.png", full_page=True)
