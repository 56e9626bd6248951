"""`onecard serve`: a real server on a free 127.0.0.1 port, driven by the official `openai` client
(streaming and not, n=2, stop strings, seeds, and every error status mapped to the client's
exception class), plus disconnects, malformed requests and the command line itself."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from onecard.conversations import normalize, prompt_ids  # noqa: E402
from onecard.errors import UsageError  # noqa: E402
from onecard.openai_api import Limits  # noqa: E402
from onecard.server import Backend, Running, create_app  # noqa: E402
from tests.serve_helpers import Record, ScriptedEngine, make_runs, model_backend, scripted_backend  # noqa: E402

HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return make_runs(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def chat_server(runs):
    server = Running(create_app(model_backend(runs[1], "chat")))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def base_server(runs):
    server = Running(create_app(model_backend(runs[0], "base")))
    yield server
    server.stop()


def client(server, **kw) -> openai.OpenAI:
    kw.setdefault("api_key", "unused")
    return openai.OpenAI(base_url=server.url + "/v1", max_retries=0, timeout=30, **kw)


def test_health_models_and_a_chat_answer(chat_server, runs):
    assert httpx.get(chat_server.url + "/health").json()["status"] == "ok"
    c = client(chat_server)
    assert [m.id for m in c.models.list().data] == ["chat"]
    card = httpx.get(chat_server.url + "/v1/models").json()["data"][0]["onecard"]
    assert card == {"kind": "chat", "context": 320, "trained_context": 32}
    answer = c.chat.completions.create(model="chat", messages=HELLO, max_tokens=8, seed=1)
    assert answer.object == "chat.completion" and len(answer.choices) == 1
    assert isinstance(answer.choices[0].message.content, str)
    assert answer.choices[0].finish_reason in ("stop", "length")
    from onecard.tokenizer import Tokenizer
    tokenizer = Tokenizer.load(runs[1] / "tokenizer")
    assert answer.usage.prompt_tokens == len(prompt_ids(tokenizer, normalize(HELLO, training=False)))
    assert 1 <= answer.usage.completion_tokens <= 8


def test_streaming_equals_the_whole_answer_for_the_same_seed(chat_server):
    c = client(chat_server)
    whole = c.chat.completions.create(model="chat", messages=HELLO, max_tokens=20, seed=7, temperature=1.0)
    chunks = list(c.chat.completions.create(model="chat", messages=HELLO, max_tokens=20, seed=7, temperature=1.0,
                                            stream=True, stream_options={"include_usage": True}))
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    ends = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert ends == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(ch.usage is None for ch in chunks[:-1])


def test_seed_reproduces_and_n_gives_several_choices(chat_server):
    c = client(chat_server)
    ask = dict(model="chat", messages=HELLO, max_tokens=16, temperature=1.0, n=2)
    first, again = c.chat.completions.create(seed=3, **ask), c.chat.completions.create(seed=3, **ask)
    other = c.chat.completions.create(seed=4, **ask)
    texts = [ch.message.content for ch in first.choices]
    assert len(texts) == 2 and [ch.index for ch in first.choices] == [0, 1]
    assert texts == [ch.message.content for ch in again.choices]
    assert texts != [ch.message.content for ch in other.choices]
    streamed = {0: "", 1: ""}
    for ch in c.chat.completions.create(seed=3, stream=True, **ask):
        for choice in ch.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert [streamed[0], streamed[1]] == texts


def test_any_int64_seed_and_one_created_time_per_stream(chat_server, monkeypatch):
    clock = iter(range(1_700_000_000, 1_800_000_000))  # a second passes at every reading of the time of day
    monkeypatch.setattr(time, "time", lambda: float(next(clock)))
    ask = dict(model="chat", messages=HELLO, max_tokens=12, temperature=1.0, stream=True)
    chunks = list(client(chat_server).chat.completions.create(seed=-(2**63), **ask))  # OpenAI's seed is any int64
    assert len(chunks) > 3 and len({ch.created for ch in chunks}) == 1
    again = "".join(ch.choices[0].delta.content or "" for ch in
                    client(chat_server).chat.completions.create(seed=-(2**63), **ask) if ch.choices)
    assert again == "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)


def test_stop_cuts_before_the_stop_string(chat_server):
    c = client(chat_server)
    ask = dict(model="chat", messages=HELLO, max_tokens=40, temperature=0)
    free = c.chat.completions.create(**ask).choices[0].message.content
    assert len(free) >= 8, free
    stop = free[5:8]
    cut = c.chat.completions.create(stop=[stop, "never-written-\u2603"], **ask).choices[0]
    assert cut.message.content == free[:free.find(stop)] and cut.finish_reason == "stop"
    streamed = "".join(ch.choices[0].delta.content or "" for ch in
                       c.chat.completions.create(stop=stop, stream=True, **ask) if ch.choices)
    assert streamed == cut.message.content


def test_base_models_complete_text_and_refuse_chat(base_server):
    c = client(base_server)
    done = c.completions.create(model="base", prompt="def ", max_tokens=6, seed=0)
    assert done.object == "text_completion" and isinstance(done.choices[0].text, str)
    streamed = "".join(ch.choices[0].text for ch in
                       c.completions.create(model="base", prompt="def ", max_tokens=6, seed=0, stream=True))
    assert streamed == done.choices[0].text
    with pytest.raises(openai.BadRequestError, match="base model"):
        c.chat.completions.create(model="base", messages=HELLO)


def test_chat_models_also_complete_text(chat_server):
    assert client(chat_server).completions.create(model="chat", prompt="x", max_tokens=3).choices[0].finish_reason


BAD = [
    ({"temperature": 3}, "temperature"), ({"temperature": "hot"}, "temperature"), ({"top_p": -0.1}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 5000}, "max_tokens"), ({"n": 0}, "n"), ({"n": 9}, "n"),
    ({"seed": 2**63}, "seed"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"stop": [""]}, "stop"),
    ({"stream": "yes"}, "stream"), ({"extra_body": {"top_k": 500}}, "top_k"),
    ({"extra_body": {"top_k": 1.5}}, "top_k"), ({"messages": []}, "messages"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "last message"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "role"),
    ({"messages": [{"role": "user", "content": 5}]}, "content"),
    ({"messages": [{"role": "user", "content": "x" * 8_001}]}, "8,000"),
    ({"messages": [{"role": "user", "content": "x" * 7_000}] * 5}, "32,000"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}] * 250
      + [{"role": "user", "content": "c"}]}, "500 messages"),
    # asked for, but not implemented: refused by name rather than answered without
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools: not implemented"),
    ({"logprobs": True}, "logprobs: not implemented"), ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"response_format": {"type": "json_object"}}, "response_format"), ({"logit_bias": {"5": 10}}, "logit_bias"),
    ({"modalities": ["text", "audio"]}, "modalities"), ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"web_search_options": {}}, "web_search_options"),
]


@pytest.mark.parametrize("change,says", BAD, ids=[says for _, says in BAD])
def test_bad_parameters_are_400(chat_server, change, says):
    ask = {"model": "chat", "messages": HELLO, "max_tokens": 2, **change}
    with pytest.raises(openai.BadRequestError, match=says) as caught:
        client(chat_server).chat.completions.create(**ask)
    assert caught.value.body["type"] == "invalid_request_error"


def test_unimplemented_fields_that_ask_for_nothing_are_accepted(chat_server):
    """What some clients send on every request: the defaults of fields this server does not implement."""
    assert client(chat_server).chat.completions.create(
        model="chat", messages=HELLO, max_tokens=2, tools=[], tool_choice="none", logprobs=False,
        presence_penalty=0, frequency_penalty=0.0, response_format={"type": "text"}, logit_bias={}).choices


def test_errors_map_to_the_clients_exceptions(chat_server, runs):
    c = client(chat_server)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        c.chat.completions.create(model="gpt-4o", messages=HELLO)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        c.models.retrieve("gpt-4o")
    with pytest.raises(openai.APIStatusError) as caught:  # 413 has no class of its own
        c.chat.completions.create(model="chat", messages=[{"role": "user", "content": "x" * 1_100_000}])
    assert caught.value.status_code == 413
    with pytest.raises(openai.UnprocessableEntityError, match="not valid JSON"):
        c.post("/chat/completions", cast_to=object, content=b'{"model": "chat", "messages": [',
               options={"headers": {"Content-Type": "application/json"}})
    with pytest.raises(openai.BadRequestError, match="context"):
        c.chat.completions.create(model="chat", messages=[{"role": "user", "content": "word " * 1500}])
    assert httpx.get(chat_server.url + "/nowhere").json()["error"]["code"] == "not_found"


def test_api_key(runs):
    server = Running(create_app(model_backend(runs[1], "chat", workers=1), api_key="s3cret"))
    try:
        with pytest.raises(openai.AuthenticationError):
            client(server, api_key="wrong").models.list()
        response = httpx.post(server.url + "/v1/chat/completions", json={"messages": HELLO})
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        assert client(server, api_key="s3cret").chat.completions.create(model="chat", messages=HELLO, max_tokens=2)
        assert httpx.get(server.url + "/health").json()["auth"] is True  # health needs no key
    finally:
        server.stop()


def test_503_while_loading_and_429_when_the_queue_is_full(runs):
    from onecard.tokenizer import Tokenizer

    loading = Running(create_app(Backend("later")))
    try:
        assert httpx.get(loading.url + "/health").status_code == 503
        with pytest.raises(openai.InternalServerError, match="loading") as caught:
            client(loading).chat.completions.create(model="later", messages=HELLO)
        assert caught.value.status_code == 503
    finally:
        loading.stop()
    record = Record()
    busy = Running(create_app(scripted_backend(Tokenizer.load(runs[1] / "tokenizer"), "slow " * 200, 0.02,
                                               record, workers=1, max_queued=1)))
    try:
        c = client(busy)
        running = c.chat.completions.create(model="scripted", messages=HELLO, stream=True)
        # generating: its first text, not the role chunk sent before a worker has taken the job (which,
        # on a loaded machine, left it in the queue and the next request was the one turned away)
        next(piece for piece in running if piece.choices[0].delta.content)
        waiting = c.chat.completions.create(model="scripted", messages=HELLO, stream=True)  # queued
        with pytest.raises(openai.RateLimitError, match="busy"):
            c.chat.completions.create(model="scripted", messages=HELLO)
        running.close()
        waiting.close()
    finally:
        busy.stop()


def test_a_client_that_disconnects_stops_its_generation(runs):
    from onecard.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(runs[1] / "tokenizer")
    for stream in (True, False):
        record = Record()
        server = Running(create_app(scripted_backend(tokenizer, "word " * 400, 0.01, record, workers=1)))
        try:
            body = {"model": "scripted", "messages": HELLO, "stream": stream}
            if stream:  # read a few events, then hang up
                with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=5) as r:
                    lines = r.iter_lines()
                    assert [next(lines) for _ in range(6)][-2].startswith("data: ")
            else:  # give up waiting for the whole answer
                with pytest.raises(httpx.ReadTimeout):
                    httpx.post(server.url + "/v1/chat/completions", json=body, timeout=0.3)
            assert record.closed.wait(5), "the generation went on after the client left"
            steps = record.steps
            assert not record.finished.is_set() and steps < 300
            time.sleep(0.2)
            assert record.steps == steps
            assert httpx.get(server.url + "/health").json()["generating"] == 0
        finally:
            server.stop()


def test_a_waiting_client_that_leaves_gives_its_queue_place_back(runs):
    """One generating, one place in the queue: a queued client that gives up must not keep the next
    one out (429) until the long generation ahead of it ends."""
    from onecard.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(runs[1] / "tokenizer")
    # long enough to outlast every step below on a busy machine (the streams close it early)
    server = Running(create_app(scripted_backend(tokenizer, "word " * 400, 0.05, workers=1, max_queued=1)))
    url = server.url + "/v1/chat/completions"
    body = {"model": "scripted", "messages": HELLO, "stream": True}
    try:
        with httpx.stream("POST", url, json=body, timeout=30):  # generates for 5 s or more
            deadline = time.monotonic() + 10
            while httpx.get(server.url + "/health").json()["generating"] == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            for stream in (False, True):
                with pytest.raises(httpx.ReadTimeout):  # waits its turn, then gives up
                    with httpx.stream("POST", url, json={**body, "stream": stream}, timeout=0.5) as r:
                        r.read()
                time.sleep(0.5)  # the server notices within a poll (0.25 s)
                assert httpx.get(server.url + "/health").json()["waiting"] == 0
                with httpx.stream("POST", url, json=body, timeout=30) as queued:
                    assert queued.status_code == 200
    finally:
        server.stop()


def test_stopping_the_server_ends_running_answers_with_a_reason(runs):
    """Ctrl-C with requests in flight: each client hears that the server is shutting down, at once."""
    import threading

    from onecard.tokenizer import Tokenizer

    server = Running(create_app(scripted_backend(Tokenizer.load(runs[1] / "tokenizer"), "word " * 400, 0.01,
                                                 workers=2)))
    whole = {}
    asking = threading.Thread(target=lambda: whole.update(r=httpx.post(
        server.url + "/v1/chat/completions", json={"messages": HELLO}, timeout=10)))
    try:
        with httpx.stream("POST", server.url + "/v1/chat/completions", json={"messages": HELLO, "stream": True},
                          timeout=10) as streamed:
            lines = streamed.iter_lines()
            assert [next(lines) for _ in range(6)][-2].startswith("data: ")
            asking.start()
            deadline = time.monotonic() + 10  # both generating (a fixed wait was a guess on a loaded machine)
            while httpx.get(server.url + "/health").json()["generating"] < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
            started = time.monotonic()
            stopping = threading.Thread(target=server.stop)
            stopping.start()
            rest = [line for line in lines if line.startswith("data: ")]
        asking.join(10)
        stopping.join(10)
        assert time.monotonic() - started < 2.5  # not the 3 s grace period and a cancellation
        assert "the server is shutting down" in rest[-2] and rest[-1] == "data: [DONE]"
        assert whole["r"].json()["error"]["message"] == "the server is shutting down"
        assert whole["r"].status_code == 503  # unavailable, as OpenAI's clients read it: not a failed request (500)
    finally:
        server.stop()


def raw(port: int, request: bytes, timeout: float = 5) -> bytes:
    """Send bytes as they are (httpx refuses to send a malformed request) and read the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        return sock.recv(65536)


def test_malformed_requests_never_take_the_server_down(runs, chat_server):
    from onecard.tokenizer import Tokenizer

    url = chat_server.url + "/v1/chat/completions"
    storm = [b"", b"null", b"[]", b"{", b"\xff\xfe\x00", b"[" * 100_000, b'{"n": ' + b"9" * 5000 + b"}",
             json.dumps({"messages": HELLO, "temperature": float("nan")}).encode(),
             json.dumps({"messages": [[]]}).encode(), json.dumps({"messages": HELLO, "stream_options": 1}).encode(),
             json.dumps({"messages": [{"role": "assistant", "content": [{"type": "image"}]}]}).encode()]
    for body in storm:
        response = httpx.post(url, content=body, headers={"Content-Type": "application/json"})
        assert response.status_code in (400, 422), (body[:40], response.text)
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.post(url, content=b"x" * 2_000_000).status_code == 413
    port = int(chat_server.url.rsplit(":", 1)[1])
    assert raw(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}") \
        .startswith(b"HTTP/1.1 400")
    assert httpx.request("DELETE", url).status_code == 405
    half = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"mess"
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(half)  # and hang up mid-body
    slow = Running(create_app(scripted_backend(Tokenizer.load(runs[1] / "tokenizer"), "x"),
                              Limits(body_timeout_s=0.3)))
    try:  # a body that never arrives in full gets 408 when its time is up
        assert raw(int(slow.url.rsplit(":", 1)[1]), half).startswith(b"HTTP/1.1 408")
    finally:
        slow.stop()
    failing = Running(create_app(scripted_backend(Tokenizer.load(runs[1] / "tokenizer"), "x", fail=True)))
    try:
        with pytest.raises(openai.InternalServerError, match="scripted failure"):
            client(failing).chat.completions.create(model="scripted", messages=HELLO)
        events = [line for line in httpx.post(failing.url + "/v1/chat/completions", timeout=10, json={
            "messages": HELLO, "stream": True}).text.splitlines() if line.startswith("data: ")]
        assert "scripted failure" in events[-2] and events[-1] == "data: [DONE]"
        assert httpx.get(failing.url + "/health").status_code == 200
    finally:
        failing.stop()
    assert client(chat_server).chat.completions.create(model="chat", messages=HELLO, max_tokens=2)


def test_the_page_is_served_with_a_policy_that_runs_only_its_own_script(chat_server):
    import base64
    import hashlib

    response = httpx.get(chat_server.url + "/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    policy = response.headers["content-security-policy"]
    script = re.search(r"<script>(.*?)</script>", response.text, flags=re.S).group(1)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}';" in policy and "unsafe-inline" not in policy
    assert "innerHTML" not in response.text and "http" not in script  # text only, nothing from the internet


def test_stop_filter_holds_back_only_what_might_begin_a_stop_string():
    from onecard.workers import StopFilter

    f = StopFilter(["END", "xyz"])
    assert f.push("abc E") == ("abc ", False)
    assert f.push("N") == ("", False)
    assert f.push("X") == ("ENX", False)  # not END after all
    assert f.push("hello EN") == ("hello ", False)
    assert f.push("D and more") == ("", True)
    assert StopFilter([]).push("anything") == ("anything", False)


def test_calculator_calls_in_the_history_go_back_to_the_model_as_tool_calls():
    from onecard.openai_api import check_messages

    messages = check_messages([{"role": "user", "content": "2+3?"},
                               {"role": "assistant", "content": "Let me see: [calculator: 2+3 = 5] it is 5."},
                               {"role": "user", "content": [{"type": "text", "text": "thanks"}]}], Limits())
    assert messages[1]["content"] == [{"type": "text", "text": "Let me see: "}, {"type": "python", "text": "2+3"},
                                      {"type": "python_output", "text": "5"}, {"type": "text", "text": " it is 5."}]
    assert messages[2]["content"] == "thanks"
    for expression, result in (('"x=y=z".count("=")', "2"), ('"[a]".count("]")', "1"), ("2 * -3", "-6")):
        said = check_messages([{"role": "user", "content": "?"},
                               {"role": "assistant", "content": f"So [calculator: {expression} = {result}] ok"},
                               {"role": "user", "content": "!"}], Limits())[1]["content"]
        assert said[1:3] == [{"type": "python", "text": expression}, {"type": "python_output", "text": result}]


def test_roles_in_any_order_become_alternating_turns():
    """OpenAI takes several system messages, one anywhere, and messages of one role in a row."""
    from onecard.openai_api import check_messages

    parts = [{"type": "text", "text": "b"}]
    said = check_messages([{"role": "system", "content": "Be brief."}, {"role": "developer", "content": "Be kind."},
                           {"role": "user", "content": "a"}, {"role": "user", "content": parts},
                           {"role": "assistant", "content": "c"}, {"role": "assistant", "content": ""},
                           {"role": "system", "content": "In French."}, {"role": "user", "content": "d"}], Limits())
    assert said == [{"role": "user", "content": "Be brief.\n\nBe kind.\n\na\n\nb"},
                    {"role": "assistant", "content": "c"}, {"role": "user", "content": "In French.\n\nd"}]
    greeting = [{"role": "assistant", "content": "How can I help?"}, {"role": "user", "content": "a"}]
    assert check_messages(greeting, Limits()) == [{"role": "user", "content": ""}, *greeting]
    assert check_messages([{"role": "system", "content": "Be brief."}, *greeting], Limits()) == [
        {"role": "user", "content": "Be brief."}, *greeting]


def test_top_p_0_and_consecutive_user_messages_are_answered(chat_server):
    c = client(chat_server)
    ask = dict(model="chat", messages=HELLO, max_tokens=8)
    greedy = c.chat.completions.create(temperature=0, **ask).choices[0].message.content
    assert c.chat.completions.create(temperature=1, top_p=0, seed=5, **ask).choices[0].message.content == greedy
    twice = [{"role": "system", "content": "Be brief."}, *HELLO, {"role": "user", "content": "Are you there?"}]
    assert c.chat.completions.create(model="chat", messages=twice, max_tokens=2).choices[0].finish_reason


def test_a_blank_reply_in_the_history_is_accepted(chat_server):
    """The model may reply with nothing but spaces; a client sends that reply back with the next turn."""
    history = HELLO + [{"role": "assistant", "content": " "}, {"role": "user", "content": "hello again"}]
    assert client(chat_server).chat.completions.create(model="chat", messages=history, max_tokens=2).choices


def test_a_body_limit_above_16_mib_is_honoured(runs):
    from onecard.tokenizer import Tokenizer

    big = Running(create_app(scripted_backend(Tokenizer.load(runs[1] / "tokenizer"), "x"),
                             Limits(max_body_bytes=40_000_000)))
    try:  # 20 MB: within the limit, past the 16 MiB read for a body that is over it
        body = json.dumps({"messages": HELLO, "max_tokens": 1, "padding": "x" * 20_000_000})
        response = httpx.post(big.url + "/v1/chat/completions", content=body, timeout=30,
                              headers={"Content-Type": "application/json"})
        assert response.status_code == 200, response.text[:200]
    finally:
        big.stop()


def test_the_kind_of_model_comes_from_the_run_or_nanochats_folder_not_from_words_in_its_path(tmp_path, runs):
    from onecard.serve import model_kind

    for folder, kind in (("database/chatsft_checkpoints/d4", "chat"), ("chats/base_checkpoints/d4", "base"),
                         ("knowledgebase-hf", "chat")):
        (tmp_path / folder).mkdir(parents=True)
        assert model_kind(tmp_path / folder, "auto") == kind, folder
    assert [model_kind(run, "auto") for run in runs] == ["base", "chat"]
    assert model_kind(tmp_path / "database/chatsft_checkpoints/d4", "base") == "base"


def test_limits_from_the_command_line():
    limits = Limits().with_overrides(["max_tokens=8192", "body_timeout_s=2.5"])
    assert limits.max_tokens == 8192 and limits.body_timeout_s == 2.5
    assert Limits().with_overrides(["max_tokens=8k", "max_body_bytes=2_000_000"]).max_tokens == 8000  # units' grammar
    for bad in ("nope=1", "max_tokens", "max_tokens=1.5", "max_tokens=-3", "max_n=abc", "max_n=inf"):
        with pytest.raises(ValueError, match="--limit"):
            Limits().with_overrides([bad])
    for bad, says in (("max_n=abc", "'abc' is not a number"), ("max_n=inf", "'inf' is not a finite number"),
                      ("max_n=1e30", "'1e30' is too large")):
        with pytest.raises(ValueError, match=says):
            Limits().with_overrides([bad])


@pytest.mark.parametrize("key", ["sécret", "two words", "tab\there"])
def test_an_api_key_no_http_header_can_carry_is_refused(tmp_path, key):
    import onecard.serve
    from onecard.cli import build_parser

    with pytest.raises(UsageError, match="printable ASCII"):
        onecard.serve.run(build_parser().parse_args(["serve", str(tmp_path), "--api-key", key]))


def test_announce_warns_when_bound_beyond_this_machine_without_a_key(capsys, tmp_path):
    from onecard.serve import announce

    announce("127.0.0.1", 8000, None, tmp_path)
    out = capsys.readouterr()
    assert "this machine only" in out.out and not out.err
    announce("0.0.0.0", 8000, None, tmp_path)
    assert "without --api-key" in capsys.readouterr().err
    announce("0.0.0.0", 8000, "key", tmp_path)
    assert not capsys.readouterr().err


def test_onecard_serve_on_the_command_line(runs):
    """The real command: it says where it listens, loads, answers, and stops on Ctrl-C."""
    process = subprocess.Popen([sys.executable, "-m", "onecard.cli", "serve", str(runs[1]), "--port", "0",
                                "--cache-memory", "0.01GiB"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        first = process.stdout.readline()
        assert "http://127.0.0.1:" in first, first
        url = re.search(r"(http://127\.0\.0\.1:\d+)/ ", first).group(1)
        assert "this machine only" in process.stdout.readline()
        deadline = time.monotonic() + 60
        while httpx.get(url + "/health").status_code != 200:
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        # the TINY runs train on 32 tokens of context; the rotary table, and so the server, takes 10x that
        ready = process.stdout.readline()
        assert "ready: chat (chat model trained on 32 tokens of context, taking up to 320;" in ready
        assert "0.01 GiB for their KV caches" in ready
        answer = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0).chat.completions.create(
            model="chat", messages=HELLO, max_tokens=3)
        assert answer.choices[0].message.content is not None
    finally:
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=30)
    assert process.returncode in (0, 130) and "Traceback" not in out, out


def test_load_benchmark_smoke_run(chat_server, tmp_path):
    """benchmarks/serve_load.py, briefly, against the running test server: it records what it measured."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_load.py"
    spec = importlib.util.spec_from_file_location("serve_load", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    record = bench.main(["--url", chat_server.url, "--clients", "3", "--seconds", "1", "--storm-seconds", "1",
                         "--max-tokens", "4", "--out", str(tmp_path)])
    assert record["load"]["requests"] >= 3 and record["load"]["failed"] == 0
    assert record["load"]["ttft_p50_s"] > 0 and record["load"]["tokens_per_s"] > 0
    storm = record["storm"]
    assert storm["request_after_storm"] == 200 and storm["health_after_storm"] == 200
    assert set(storm["statuses"]["bad JSON"]) == {"422"} and set(storm["statuses"]["huge body"]) == {"413"}
    assert set(storm["statuses"]["wrong types"]) == {"400"} and set(storm["statuses"]["bad values"]) == {"400"}
    assert json.loads(next(tmp_path.glob("serve_load_*.json")).read_text())["commit"]


def test_kv_caches_share_one_budget_first_come_first_served():
    import threading

    from onecard.workers import CacheMemory

    memory, order = CacheMemory(1000), []
    never = threading.Event()
    assert memory.take(600, never)

    def take(name: str, nbytes: int, cancelled: threading.Event = never) -> threading.Thread:
        thread = threading.Thread(target=lambda: order.append((name, memory.take(nbytes, cancelled))))
        before, deadline = memory.waiting, time.monotonic() + 10
        thread.start()
        while memory.waiting == before and time.monotonic() < deadline:  # in line before the next
            time.sleep(0.01)
        return thread

    gives_up = threading.Event()
    waiting = [take("big", 900), take("cancelled", 10, gives_up), take("small", 200)]
    assert order == [] and memory.waiting == 3  # the small one fits, but waits its turn behind the big one
    gives_up.set()
    waiting[1].join(2)
    assert order == [("cancelled", False)]
    memory.give_back(600)
    waiting[0].join(2)
    assert order[1] == ("big", True) and memory.used == 900 and memory.waiting == 1
    memory.give_back(900)
    waiting[2].join(2)
    assert order[2] == ("small", True) and memory.used == 200
    assert CacheMemory(None).take(10**15, never)  # no budget: no limit


def test_a_request_waits_for_kv_cache_memory_and_one_too_large_is_400(runs):
    from onecard.tokenizer import Tokenizer

    backend = Backend("scripted", workers=2, max_queued=4, cache_memory=1000)
    backend.cache_need = lambda prompt, new, samples: 400 * samples
    tokenizer = Tokenizer.load(runs[1] / "tokenizer")
    record = Record()
    backend.ready(lambda tools: ScriptedEngine(tokenizer, "word " * 100, 0.01, record), tokenizer, 10_000, "chat")
    server = Running(create_app(backend))
    try:
        c = client(server)
        with pytest.raises(openai.BadRequestError, match="GiB for their KV caches"):
            c.chat.completions.create(model="scripted", messages=HELLO, n=3)
        first = c.chat.completions.create(model="scripted", messages=HELLO, n=2, stream=True)
        next(part for part in first if any(choice.delta.content for choice in part.choices))  # generating
        second = c.chat.completions.create(model="scripted", messages=HELLO, n=2, stream=True)  # 800 + 800 > 1000
        time.sleep(0.3)
        health = httpx.get(server.url + "/health").json()
        assert (health["generating"], health["waiting"]) == (1, 1)
        first.close()
        text = "".join(choice.delta.content or "" for part in second for choice in part.choices if choice.index == 0)
        assert text.startswith("word word")
    finally:
        server.stop()


def test_other_web_pages_are_refused_unless_allowed(runs):
    """A page elsewhere can POST as text/plain with no preflight: only the server's own page, clients
    that send no Origin, and --allow-origin's pages may start a generation."""
    body = json.dumps({"messages": HELLO, "max_tokens": 2})
    server = Running(create_app(model_backend(runs[1], "chat", workers=1)))
    try:
        post = lambda **headers: httpx.post(server.url + "/v1/chat/completions", content=body,  # noqa: E731
                                            headers={"Content-Type": "text/plain", **headers}, timeout=60)
        refused = post(Origin="https://evil.example")
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "origin_not_allowed"
        assert "--allow-origin https://evil.example" in refused.json()["error"]["message"]
        assert post(Origin="null").status_code == 403  # a sandboxed frame or a file
        own = server.url.removeprefix("http://")
        assert post(Origin=f"http://{own}").status_code == 200  # the server's own chat page
        assert post().status_code == 200  # curl, the openai client
        assert "access-control-allow-origin" not in post().headers
    finally:
        server.stop()
    allowed = Running(create_app(model_backend(runs[1], "chat", workers=1), allow_origins=("http://localhost:3000",)))
    try:
        preflight = httpx.options(allowed.url + "/v1/chat/completions", timeout=10, headers={
            "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "http://localhost:3000"
        answer = httpx.post(allowed.url + "/v1/chat/completions", content=body, timeout=60,
                            headers={"Content-Type": "application/json", "Origin": "http://localhost:3000"})
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == "http://localhost:3000"
        assert httpx.post(allowed.url + "/v1/chat/completions", content=body, timeout=60,
                          headers={"Origin": "http://localhost:4000"}).status_code == 403
    finally:
        allowed.stop()


def test_an_allowed_page_may_send_the_javascript_clients_headers(runs):
    """openai's JavaScript client adds x-stainless-* headers to every request: a preflight that
    refused them would keep an --allow-origin page from using the official client at all."""
    allowed = Running(create_app(model_backend(runs[1], "chat", workers=1), allow_origins=("http://localhost:3000",)))
    try:
        asked = "authorization, content-type, x-stainless-os, x-stainless-retry-count"
        preflight = httpx.options(allowed.url + "/v1/chat/completions", timeout=10, headers={
            "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": asked})
        assert preflight.status_code == 200, preflight.text
        assert "x-stainless-os" in preflight.headers["access-control-allow-headers"]
        assert httpx.options(allowed.url + "/v1/chat/completions", timeout=10, headers={
            "Origin": "http://localhost:4000", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": asked}).status_code == 400  # other pages still are not
    finally:
        allowed.stop()


@pytest.mark.parametrize("text", ["http://localhost:3000/app", "localhost:3000", "ftp://x", "http://u@x"])
def test_allow_origin_takes_origins_only(text):
    from onecard.serve import origin

    with pytest.raises(argparse.ArgumentTypeError, match="expected an origin"):
        origin(text)
    assert origin("http://localhost:3000/") == "http://localhost:3000" and origin("*") == "*"
