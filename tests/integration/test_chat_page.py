"""The browser chat page at ``/``, driven in headless Chromium (Debian's ``chromium`` + ``chromium-driver``).

The served model is a tiny random GPT-2 whose greedy reply to the prompt is known (computed here with the engine
a replica runs), so the page's text is checked exactly. A per-step delay makes replies slow enough to watch
them stream and to stop one.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from serve_fixtures import free_port, make_tiny_checkpoint, wait_for

pytestmark = pytest.mark.integration

PROMPT = "你喜欢什么运动?"
REPO = Path(__file__).resolve().parents[2]
OUTPUT = Path(os.environ.get("CHATRAY_TEST_OUTPUT", REPO / "test-output"))
CHROMIUM, DRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")


def _greedy(folder: Path, messages: list[dict], max_tokens: int):
    from chatray.model import load_model, load_model_tokenizer
    from chatray.serve.engine import GenerationEngine
    from chatray.serve.sampling import SamplingParams

    tok = load_model_tokenizer(folder)
    ids = tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
              add_special_tokens=False)["input_ids"]
    engine = GenerationEngine(load_model(folder), tok, max_batch_size=1)
    return engine.generate([ids], SamplingParams(max_tokens=max_tokens, temperature=0.0))[0]


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and DRIVER):
        pytest.skip("no chromium/chromedriver: apt-get install chromium chromium-driver (Debian) to run the page test")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,800",
                "--lang=zh-CN"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def page_url(ray_session, tmp_path_factory):
    """The chat page of a deployed app whose greedy reply to PROMPT runs 100 tokens without an EOS."""
    from ray import serve

    from chatray.serve.app import build_app_with_options

    root = tmp_path_factory.mktemp("page")
    messages = [{"role": "user", "content": PROMPT}]
    for seed in range(30):
        folder = make_tiny_checkpoint(root / f"run-{seed}" / "checkpoint_00000001", seed=seed)
        long = _greedy(folder, messages, 100)
        if long.finish_reason == "length" and len(long.text) > 20:
            break
    else:
        pytest.fail("no seed gives a 100-token greedy reply")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 60})
    app = build_app_with_options(
        {"checkpoint": f"{folder.parent}:best", "api_key_env": None, "step_delay_s": 0.05},
        {"Ingress": {"ray_actor_options": {"num_cpus": 0.05}},
         "Generator": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.1}}})
    serve.run(app, name="page", route_prefix="/page")
    try:
        yield {"url": f"http://127.0.0.1:{port}/page", "folder": folder, "long": long.text}
    finally:
        serve.shutdown()


def _set(driver, field: str, value: str) -> None:
    driver.execute_script("document.getElementById(arguments[0]).value = arguments[1]", field, value)


def _say(driver, text: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.ID, "input")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def _last_reply(driver) -> tuple[str, str]:
    """(text, state) of the newest assistant bubble."""
    return tuple(driver.execute_script(
        "const b = [...document.querySelectorAll('.msg.assistant')].pop();"
        "return b ? [b.textContent, b.dataset.state] : ['', 'none'];"))


def test_chat_page_streams_stops_and_keeps_the_conversation(browser, page_url):
    d = browser
    d.get(page_url["url"])
    wait_for(lambda: "step 1" in d.find_element("id", "model").text, timeout=30, what="the model line")
    model_line = d.find_element("id", "model").text
    assert model_line == f"{page_url['folder'].parent.name} · step 1 · eval loss 5.000", model_line
    # Record every request body the page sends (what the server is asked, turn by turn).
    d.execute_script("window.__bodies = []; const f = window.fetch; window.fetch = (u, o) => {"
                     " if (o && o.body) window.__bodies.push(JSON.parse(o.body)); return f(u, o); };")
    _set(d, "temperature", "0")
    _set(d, "max_tokens", "20")

    # 1. A reply streams: text shows while the bubble is still streaming, and ends as the greedy reply.
    _say(d, PROMPT)
    seen: list[tuple[str, str]] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        seen.append(_last_reply(d))
        if seen[-1][1] == "done":
            break
        time.sleep(0.02)
    assert seen[-1][1] == "done", seen[-1]
    assert any(text and state == "streaming" for text, state in seen), "text appeared before the reply ended"
    expected = _greedy(page_url["folder"], [{"role": "user", "content": PROMPT}], 20).text
    assert seen[-1][0] == expected and expected
    assert "tokens/s" in d.find_element("id", "speed").text

    # 2. A second message carries the conversation.
    _set(d, "max_tokens", "5")
    _say(d, "hello")
    wait_for(lambda: _last_reply(d)[1] == "done", timeout=60, what="the second reply")
    bodies = d.execute_script("return window.__bodies")
    assert [m["content"] for m in bodies[-1]["messages"]] == [PROMPT, expected, "hello"]
    assert [m["role"] for m in bodies[-1]["messages"]] == ["user", "assistant", "user"]
    assert (bodies[-1]["temperature"], bodies[-1]["max_tokens"], bodies[-1]["stream"]) == (0, 5, True)

    # 3. A long reply, stopped: it stays as far as it got and the conversation keeps it.
    d.find_element("id", "clear").click()
    _set(d, "max_tokens", "100")
    _say(d, PROMPT)
    wait_for(lambda: len(_last_reply(d)[0]) >= 3, timeout=60, interval=0.02, what="the long reply to start")
    d.find_element("id", "stop").click()
    wait_for(lambda: _last_reply(d)[1] == "stopped", timeout=10, what="the stopped state")
    partial = _last_reply(d)[0]
    time.sleep(1.0)
    assert _last_reply(d)[0] == partial, "nothing arrives after stop"
    assert page_url["long"].startswith(partial) and len(partial) < len(page_url["long"])
    conversation = d.execute_script("return window.chatray.messages")
    assert conversation == [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": partial}]
    assert not d.find_element("id", "send").get_attribute("disabled")

    OUTPUT.mkdir(parents=True, exist_ok=True)
    shot = OUTPUT / "chat_page.png"
    d.save_screenshot(str(shot))
    assert shot.stat().st_size > 5_000
    print(f"screenshot: {shot}")


def test_chat_page_is_self_contained(page_url):
    import httpx

    r = httpx.get(page_url["url"] + "/", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "connect-src 'self'" in r.headers["content-security-policy"]
    assert 'content="/page"' in r.text  # the route prefix the page calls /v1 under
    assert "http://" not in r.text and "https://" not in r.text, "no CDN or other origin"
    json.dumps(r.text)  # plain text, decodes


def test_chat_page_asks_for_the_api_key_when_auth_is_on(browser, page_url, tmp_path):
    from ray import serve

    from chatray.serve.app import build_app_with_options

    key_file = tmp_path / "api-key"
    key_file.write_text("page-key-123\n")
    app = build_app_with_options(
        {"checkpoint": str(page_url["folder"]), "api_key_file": str(key_file)},
        {"Ingress": {"ray_actor_options": {"num_cpus": 0.05}},
         "Generator": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.1}}})
    serve.run(app, name="locked", route_prefix="/locked")
    d = browser
    d.get(page_url["url"].replace("/page", "/locked"))
    wait_for(lambda: d.find_element("id", "keybox").is_displayed(), timeout=30, what="the API key field")
    assert d.find_element("id", "model").text == "this endpoint needs an API key"
    d.find_element("id", "api_key").send_keys("page-key-123")
    d.find_element("id", "temperature").click()  # leaving the field fires its change event
    wait_for(lambda: "step 1" in d.find_element("id", "model").text, timeout=30, what="the model line")
    _set(d, "max_tokens", "3")
    _say(d, "hello")
    wait_for(lambda: _last_reply(d)[1] == "done", timeout=60, what="a reply with the key")
    serve.delete("locked")
