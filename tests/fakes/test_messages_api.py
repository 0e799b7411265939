"""The scripted Messages API, driven by the real `anthropic` SDK."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import anthropic
import pytest

from tests.fakes.messages_api import (MessagesAPI, count_tokens, http_error, messages_api, stream_error, text, tool_use,
                                     turn)
from tests.fakes.messages_rules import validate

MODEL = "claude-sonnet-5-5"
READ_FILE = {"name": "read_file", "description": "Read a file.",
             "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}
ASK = [{"role": "user", "content": "Fix the bug."}]


def client_for(api: MessagesAPI, max_retries: int = 0) -> anthropic.AsyncAnthropic:
    """A real SDK client pointed at the fake."""
    return anthropic.AsyncAnthropic(base_url=api.url, api_key="sk-ant-test-key", max_retries=max_retries, timeout=5)


async def test_a_streamed_turn_arrives_in_pieces_and_accumulates_into_the_final_message() -> None:
    answer = "I looked at the repository and the bug is in the parser."
    async with asyncio.timeout(5), messages_api([turn(text(answer), input_tokens=120, output_tokens=14,
                                                      cache_read_input_tokens=100)]) as api:
        async with client_for(api) as client, \
                client.messages.stream(model=MODEL, max_tokens=100, messages=ASK) as stream:
            pieces = [piece async for piece in stream.text_stream]
            message = await stream.get_final_message()
    assert len(pieces) > 1 and "".join(pieces) == answer
    assert message.content[0].text == answer and message.stop_reason == "end_turn" and message.model == MODEL
    assert (message.usage.input_tokens, message.usage.output_tokens, message.usage.cache_read_input_tokens,
            message.usage.cache_creation_input_tokens) == (120, 14, 100, 0)
    assert message.id.startswith("msg_")
    assert api.requests[0]["messages"] == ASK and api.requests[0]["stream"] is True


async def test_the_raw_stream_carries_the_real_event_sequence() -> None:
    async with asyncio.timeout(5), messages_api([turn(text("Hi."), tool_use("read_file", {"path": "a.py"}))]) as api:
        async with client_for(api) as client:
            events = [event async for event in await client.messages.create(
                model=MODEL, max_tokens=100, messages=ASK, tools=[READ_FILE], stream=True)]
    kinds = [event.type for event in events]
    assert kinds[:2] == ["message_start", "content_block_start"] and kinds[-2:] == ["message_delta", "message_stop"]
    start = events[0].message
    assert start.content == [] and start.stop_reason is None and start.role == "assistant" and start.usage.input_tokens
    assert [e.index for e in events if e.type == "content_block_stop"] == [0, 1]
    partials = [e.delta.partial_json for e in events if e.type == "content_block_delta" and e.index == 1]
    assert partials[0] == "" and len(partials) > 2 and "".join(partials) == '{"path": "a.py"}'
    assert events[-2].delta.stop_reason == "tool_use" and events[-2].usage.output_tokens > 0


async def test_a_tool_call_round_trip_hands_the_model_its_result() -> None:
    def answer(body: dict[str, Any]) -> Any:
        result = body["messages"][-1]["content"][0]
        return turn(text(f"The file says {result['content']}."))

    async with asyncio.timeout(5), messages_api([turn(text("I'll look."), tool_use("read_file", {"path": "a.py"})),
                                                 answer]) as api:
        async with client_for(api) as client:
            async with client.messages.stream(model=MODEL, max_tokens=100, messages=ASK, tools=[READ_FILE]) as stream:
                first = await stream.get_final_message()
            call = first.content[1]
            assert first.stop_reason == "tool_use" and call.type == "tool_use" and call.input == {"path": "a.py"}
            assert call.id.startswith("toolu_")
            history = [*ASK, {"role": "assistant", "content": first.content},
                       {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                                     "content": "print(1)"}]}]
            async with client.messages.stream(model=MODEL, max_tokens=100, messages=history,
                                              tools=[READ_FILE]) as stream:
                second = await stream.get_final_message()
    assert second.content[0].text == "The file says print(1)."
    assert api.requests[1]["tools"] == [READ_FILE]
    assert api.requests[1]["messages"][1]["content"][1] == {"type": "tool_use", "id": call.id, "name": "read_file",
                                                            "input": {"path": "a.py"}}


async def test_a_call_without_stream_gets_one_whole_message() -> None:
    async with asyncio.timeout(5), messages_api([turn(text("Cut off"), stop_reason="max_tokens")]) as api:
        async with client_for(api) as client:
            message = await client.messages.create(model=MODEL, max_tokens=2, messages=ASK)
    assert message.content[0].text == "Cut off" and message.stop_reason == "max_tokens"
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0
    assert "stream" not in api.requests[0]


async def test_with_a_latency_each_answer_takes_at_least_that_long() -> None:
    latency = 0.2
    async with asyncio.timeout(5), messages_api([turn(text("Slow.")), turn(text("Slower."))],
                                                latency_s=latency) as api:
        async with client_for(api) as client:
            took = []
            for _ in range(2):
                started = time.monotonic()
                async with client.messages.stream(model=MODEL, max_tokens=10, messages=ASK) as stream:
                    message = await stream.get_final_message()
                took.append(time.monotonic() - started)
    assert message.content[0].text == "Slower." and all(t >= latency for t in took)


async def test_the_sdk_finds_the_fake_through_its_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    async with asyncio.timeout(5), messages_api([turn(text("Hello."))]) as api:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", api.url)
        monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test-key")
        async with anthropic.AsyncAnthropic() as client:
            message = await client.messages.create(model=MODEL, max_tokens=10, messages=ASK)
    assert message.content[0].text == "Hello."


def tool_exchange(result_first: bool = True) -> list[dict[str, Any]]:
    """A history with one tool call and its answer."""
    result = {"type": "tool_result", "tool_use_id": "toolu_01abc", "content": "ok"}
    note = {"type": "text", "text": "Here it is."}
    return [*ASK, {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_01abc", "name": "read_file",
                                                     "input": {"path": "a.py"}}]},
            {"role": "user", "content": [result, note] if result_first else [note, result]}]


CACHED = {"type": "text", "text": "Rules.", "cache_control": {"type": "ephemeral"}}
REFUSED = {
    "a tool name outside the pattern": ({"tools": [{**READ_FILE, "name": "sandbox.read_file"}]}, "should match"),
    "a tool schema that is not an object": ({"tools": [{**READ_FILE, "input_schema": {"type": "string"}}]},
                                            "input_schema.type"),
    "a tool_use left unanswered": ({"messages": tool_exchange()[:2] + ASK, "tools": [READ_FILE]},
                                   "without `tool_result` blocks immediately after: toolu_01abc"),
    "a tool_result that is not first": ({"messages": tool_exchange(result_first=False), "tools": [READ_FILE]},
                                        "must come first"),
    "a tool_result for no tool_use": ({"messages": [ASK[0], {"role": "assistant", "content": "Hm."},
                                                    tool_exchange()[2]], "tools": [READ_FILE]},
                                      "unexpected `tool_use_id`"),
    "tool blocks without tools": ({"messages": tool_exchange()}, "must define tools"),
    "an empty text block": ({"messages": [{"role": "user", "content": [{"type": "text", "text": ""}]}]},
                            "messages: text content blocks must be non-empty"),
    "five cache_control blocks": ({"system": [CACHED] * 3, "messages": [{"role": "user", "content": [CACHED]}],
                                   "tools": [{**READ_FILE, "cache_control": {"type": "ephemeral"}}]},
                                  "A maximum of 4 blocks with cache_control may be provided. Found 5."),
    "a whitespace-only text block": ({"messages": [{"role": "user", "content": " \n"}]},
                                     "messages: text content blocks must contain non-whitespace text"),
    "a first message from the assistant": ({"messages": [{"role": "assistant", "content": "Hi."}, *ASK]},
                                           "first message"),
    "max_tokens of zero": ({"max_tokens": 0}, "max_tokens"),
}


@pytest.mark.parametrize("change", list(REFUSED), ids=list(REFUSED))
async def test_a_request_the_real_api_refuses_gets_its_400_and_fails_the_test(change: str) -> None:
    overrides, expected = REFUSED[change]
    request = {"model": MODEL, "max_tokens": 100, "messages": ASK, **overrides}
    with pytest.raises(AssertionError, match="call 1 refused") as failure:
        async with asyncio.timeout(5), messages_api([]) as api:
            async with client_for(api) as client:
                with pytest.raises(anthropic.BadRequestError) as refused:
                    await client.messages.create(**request)
    error = refused.value.body
    assert refused.value.status_code == 400 and error["type"] == "error"
    assert error["error"]["type"] == "invalid_request_error" and expected in error["error"]["message"]
    assert expected in str(failure.value) and api.requests == [request]


async def test_consecutive_turns_of_one_role_are_accepted_as_the_real_api_merges_them() -> None:
    messages = [*ASK, {"role": "user", "content": "And add a test."}]
    async with asyncio.timeout(5), messages_api([turn(text("Both done."))]) as api:
        async with client_for(api) as client:
            message = await client.messages.create(model=MODEL, max_tokens=10, messages=messages)
    assert message.content[0].text == "Both done."


def test_a_tool_result_may_follow_in_a_second_user_turn_when_the_merged_turn_starts_with_it() -> None:
    messages = tool_exchange()
    split = [*messages[:2], {"role": "user", "content": [messages[2]["content"][0]]},
             {"role": "user", "content": [messages[2]["content"][1]]}]
    assert validate({"model": MODEL, "max_tokens": 5, "messages": split, "tools": [READ_FILE]}) is None


async def test_an_overloaded_answer_is_retried_by_the_sdk_without_a_long_wait() -> None:
    async with asyncio.timeout(3), messages_api([http_error(529), http_error(429, message="Slow down"),
                                                 turn(text("Made it."))]) as api:
        async with client_for(api, max_retries=2) as client:
            async with client.messages.stream(model=MODEL, max_tokens=10, messages=ASK) as stream:
                message = await stream.get_final_message()
    assert message.content[0].text == "Made it." and len(api.requests) == 3


async def test_an_error_the_server_says_not_to_retry_reaches_the_caller_with_the_real_body() -> None:
    async with asyncio.timeout(5), messages_api([http_error(529, should_retry=False)]) as api:
        async with client_for(api, max_retries=2) as client:
            with pytest.raises(anthropic.OverloadedError) as overloaded:
                await client.messages.create(model=MODEL, max_tokens=10, messages=ASK)
    assert overloaded.value.body["error"] == {"type": "overloaded_error", "message": "Overloaded"}
    assert len(api.requests) == 1


async def test_an_error_event_inside_the_stream_raises_after_the_partial_text() -> None:
    pieces: list[str] = []
    async with asyncio.timeout(5), messages_api([stream_error(partial_text="Let me think")]) as api:
        async with client_for(api, max_retries=2) as client:
            with pytest.raises(anthropic.APIStatusError) as failed:
                async with client.messages.stream(model=MODEL, max_tokens=10, messages=ASK) as stream:
                    async for piece in stream.text_stream:
                        pieces.append(piece)
    assert "".join(pieces) == "Let me think"
    assert failed.value.body["error"]["type"] == "overloaded_error" and len(api.requests) == 1


async def test_a_call_beyond_the_script_fails_the_test() -> None:
    with pytest.raises(AssertionError, match="unexpected call 2"):
        async with asyncio.timeout(5), messages_api([turn(text("Only one."))]) as api:
            async with client_for(api) as client:
                await client.messages.create(model=MODEL, max_tokens=10, messages=ASK)
                with pytest.raises(anthropic.BadRequestError):
                    await client.messages.create(model=MODEL, max_tokens=10, messages=ASK)


async def test_scripted_steps_left_unused_fail_the_test() -> None:
    with pytest.raises(AssertionError, match="1 scripted step"):
        async with asyncio.timeout(5), messages_api([turn(text("One.")), turn(text("Never asked."))]) as api:
            async with client_for(api) as client:
                await client.messages.create(model=MODEL, max_tokens=10, messages=ASK)


async def test_a_step_that_fails_its_own_assertion_fails_the_test() -> None:
    def expect_a_tool_result(body: dict[str, Any]) -> Any:
        assert len(body["messages"]) == 3, "wanted a tool result"
        return turn(text("Thanks."))

    with pytest.raises(AssertionError, match="wanted a tool result"):
        async with asyncio.timeout(5), messages_api([expect_a_tool_result]) as api:
            async with client_for(api) as client:
                with pytest.raises(anthropic.BadRequestError):
                    await client.messages.create(model=MODEL, max_tokens=10, messages=ASK)


# Context: the window, token counting, prompt caching and context editing.

RULES = "The repository's conventions, one rule after another, all of them long. " * 60  # about 1200 tokens
CACHED_RULES = [{"type": "text", "text": RULES, "cache_control": {"type": "ephemeral"}}]
EDITING = "context-management-2025-06-27"


def split(message: Any) -> tuple[int, int, int]:
    """A response's input tokens: uncached, read from the cache, written to it."""
    usage = message.usage
    return usage.input_tokens, usage.cache_read_input_tokens, usage.cache_creation_input_tokens


async def test_a_prompt_over_the_context_window_is_refused_with_the_real_message_and_takes_no_step() -> None:
    async with asyncio.timeout(5), messages_api([turn(text("Short enough."))], context_window=1000) as api:
        async with client_for(api) as client:
            long = await client.messages.count_tokens(model=MODEL, system=RULES, messages=ASK)
            with pytest.raises(anthropic.BadRequestError) as refused:
                await client.messages.create(model=MODEL, max_tokens=100, system=RULES, messages=ASK)
            short = await client.messages.count_tokens(model=MODEL, messages=ASK)
            with pytest.raises(anthropic.BadRequestError) as no_room:
                await client.messages.create(model=MODEL, max_tokens=1000, messages=ASK)
            message = await client.messages.create(model=MODEL, max_tokens=1000 - short.input_tokens, messages=ASK)
    assert long.input_tokens > 1000 and refused.value.body["error"] == {
        "type": "invalid_request_error", "message": f"prompt is too long: {long.input_tokens} tokens > 1000 maximum"}
    assert no_room.value.body["error"]["message"] == \
        f"input length and `max_tokens` exceed context limit: {short.input_tokens} + 1000 > 1000, decrease input " \
        "length or `max_tokens` and try again"
    assert message.content[0].text == "Short enough."
    assert api.too_long == [long.input_tokens, short.input_tokens] and api.problems == []


async def test_without_a_context_window_any_prompt_is_answered() -> None:
    async with asyncio.timeout(5), messages_api([turn(text("Read it all."))], context_window=None) as api:
        async with client_for(api) as client:
            message = await client.messages.create(model=MODEL, max_tokens=10**6, system=RULES * 200, messages=ASK)
    assert message.usage.input_tokens > 200_000 and api.too_long == []


async def test_count_tokens_is_what_a_turn_reports_as_its_input_and_is_checked_like_a_turn() -> None:
    history = tool_exchange()
    tools = [{**READ_FILE, "cache_control": {"type": "ephemeral"}}]
    async with asyncio.timeout(5), messages_api([turn(text("Fixed.")), turn(text("Again."))]) as api:
        async with client_for(api) as client:
            counted = await client.messages.count_tokens(model=MODEL, system=CACHED_RULES, messages=history,
                                                         tools=tools)
            async with client.messages.stream(model=MODEL, max_tokens=100, system=CACHED_RULES, messages=history,
                                              tools=tools) as stream:
                first = await stream.get_final_message()
            second = await client.messages.create(model=MODEL, max_tokens=100, system=CACHED_RULES,
                                                  messages=history, tools=tools)
    assert counted.input_tokens == sum(split(first)) == sum(split(second)) == count_tokens(api.requests[0])
    assert split(first)[1] == 0 and split(second)[2] == 0 and split(second)[1] == split(first)[2] > 0
    assert first.usage.output_tokens > 0 and "max_tokens" not in api.counted[0]


async def test_count_tokens_refuses_what_a_turn_would_and_needs_the_same_credential() -> None:
    with pytest.raises(AssertionError, match="count_tokens call 1 refused: Requests which include") as failure:
        async with asyncio.timeout(5), messages_api([]) as api:
            async with client_for(api) as client:
                with pytest.raises(anthropic.BadRequestError) as refused:
                    await client.messages.count_tokens(model=MODEL, messages=tool_exchange())
            async with aiohttp.ClientSession() as http, http.post(
                    f"{api.url}/v1/messages/count_tokens", json={"model": MODEL, "messages": ASK},
                    headers={"anthropic-version": "2023-06-01"}) as keyless:
                status = keyless.status
    assert "must define tools" in refused.value.body["error"]["message"] and status == 401
    assert "count_tokens call 2: x-api-key header is required." in str(failure.value) and api.requests == []


def test_the_tokenizer_counts_about_one_token_per_few_characters_of_every_part() -> None:
    bare = {"model": MODEL, "messages": ASK}
    grown = [{**bare, "system": RULES}, {**bare, "tools": [READ_FILE]},
             {**bare, "messages": [*ASK, {"role": "assistant", "content": "Sure. " * 100}]}, tool_exchange()]
    assert 1000 < count_tokens({**bare, "system": RULES}) - count_tokens(bare) < 1400
    assert all(count_tokens(body if "model" in body else {**bare, "messages": body, "tools": [READ_FILE]})
               > count_tokens(bare) for body in grown)
    assert count_tokens({**bare, "system": CACHED_RULES}) == count_tokens({**bare, "system": RULES})


async def test_a_repeated_prefix_is_read_from_the_cache_and_a_change_early_in_it_misses() -> None:
    tools = [{**READ_FILE, "cache_control": {"type": "ephemeral"}}]
    renamed = [{**tools[0], "description": "Read one file."}]
    later = [*tool_exchange(), {"role": "assistant", "content": "Done."}, {"role": "user", "content": "Thanks."}]
    script = [turn(text("Ok.")) for _ in range(4)]
    async with asyncio.timeout(5), messages_api(script) as api:
        async with client_for(api) as client:
            asked = [await client.messages.create(model=MODEL, max_tokens=10, system=CACHED_RULES, tools=t,
                                                  messages=m)
                     for t, m in [(tools, tool_exchange()), (tools, later), (renamed, later), (renamed, later)]]
    written, read, again, hit = [split(message) for message in asked]
    assert written[1] == 0 and written[2] > 1024
    assert read[1] == written[2] and read[2] == 0 and read[0] > written[0]  # a longer conversation after them
    assert again[1] == 0 and again[2] == read[1]  # a tool described anew: the whole prefix after it is written
    assert hit[1] == again[2] and hit[2] == 0


async def test_a_prefix_shorter_than_the_models_minimum_is_never_cached_and_each_model_has_its_own() -> None:
    short = [{**CACHED_RULES[0], "text": RULES[:3000]}]  # about 830 tokens
    haiku, opus = "claude-haiku-5-5", "claude-opus-5-5"
    script = [turn(text("Ok.")) for _ in range(7)]
    async with asyncio.timeout(5), messages_api(script) as api:
        async with client_for(api) as client:
            asked = [await client.messages.create(model=model, max_tokens=10, system=system, messages=ASK)
                     for model, system in [(MODEL, short), (MODEL, short), (haiku, CACHED_RULES),
                                           (haiku, CACHED_RULES), (MODEL, CACHED_RULES), (MODEL, CACHED_RULES),
                                           (opus, CACHED_RULES)]]
    usage = [split(message) for message in asked]
    assert usage[0] == usage[1] and usage[0][1:] == (0, 0) and usage[0][0] > 800
    assert usage[2] == usage[3] and usage[2][1:] == (0, 0) and 1024 < usage[2][0] < 2048
    assert usage[4][2] > 1024 and usage[5][1] == usage[4][2] and usage[6] == usage[4]


async def test_a_breakpoint_finds_a_cached_prefix_at_most_20_blocks_back() -> None:
    blocks = [{"type": "text", "text": f"Note {i}."} for i in range(30)]

    def marked(k: int) -> list[dict[str, Any]]:
        return [{"role": "user", "content": [*blocks[:k], {**blocks[k], "cache_control": {"type": "ephemeral"}},
                                             *blocks[k + 1:]]}]

    script = [turn(text("Ok.")) for _ in range(3)]
    async with asyncio.timeout(5), messages_api(script) as api:
        async with client_for(api) as client:
            asked = [await client.messages.create(model=MODEL, max_tokens=10, system=RULES, messages=marked(k))
                     for k in (0, 21, 20)]
    first, too_far, near = [split(message) for message in asked]
    assert first[1] == 0 and first[2] > 1024
    assert too_far[1] == 0 and too_far[2] > first[2]
    assert near[1] == first[2] and 0 < near[2] < too_far[2] - first[2]


async def test_a_cached_prefix_expires_after_five_minutes_unless_read() -> None:
    marked_ask = [{"role": "user", "content": [{"type": "text", "text": "Fix the bug.",
                                                "cache_control": {"type": "ephemeral"}}]}]
    # At minute 4 the prefix is found by looking back from a later breakpoint: reading it renews it all the same.
    calls = [(0, CACHED_RULES, ASK), (4, RULES, marked_ask), (8, CACHED_RULES, ASK), (14, CACHED_RULES, ASK)]
    async with asyncio.timeout(5), messages_api([turn(text("Ok.")) for _ in calls]) as api:
        now = [1000.0]
        api.cache.clock = lambda: now[0]
        async with client_for(api) as client:
            usage = []
            for minutes, system, messages in calls:
                now[0] = 1000.0 + 60 * minutes
                usage.append(split(await client.messages.create(model=MODEL, max_tokens=10, system=system,
                                                                messages=messages)))
    written = usage[0][2]
    assert written > 0 and [u[1] for u in usage] == [0, written, written, 0]


def long_tool_history(n: int) -> list[dict[str, Any]]:
    """A conversation with `n` tool calls, each answered with a long result, then a question."""
    messages: list[dict[str, Any]] = [*ASK]
    for i in range(n):
        messages += [{"role": "assistant", "content": [{"type": "tool_use", "id": f"toolu_{i}", "name": "read_file",
                                                        "input": {"path": f"f{i}.py"}}]},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": f"toolu_{i}",
                                                   "content": f"# file {i}\n" + "x = 1\n" * 500}]}]
    return [*messages[:-1], {"role": "user", "content": [*messages[-1]["content"], {"type": "text", "text": "So?"}]}]


async def test_clearing_old_tool_uses_shrinks_the_prompt_and_is_reported_as_the_sdk_expects() -> None:
    history = long_tool_history(4)
    clearing = {"edits": [{"type": "clear_tool_uses_20250919", "trigger": {"type": "input_tokens", "value": 3000},
                           "keep": {"type": "tool_uses", "value": 1}}]}
    request = {"model": MODEL, "messages": history, "tools": [READ_FILE], "context_management": clearing,
               "betas": [EDITING]}
    async with asyncio.timeout(5), messages_api([turn(text("Cleared.")), turn(text("Streamed."))]) as api:
        async with client_for(api) as client:
            counted = await client.beta.messages.count_tokens(**request)
            message = await client.beta.messages.create(max_tokens=100, **request)
            async with client.beta.messages.stream(max_tokens=100, **request) as stream:
                streamed = await stream.get_final_message()
    whole = count_tokens(api.requests[0])
    edit = message.context_management.applied_edits[0]
    assert (edit.type, edit.cleared_tool_uses) == ("clear_tool_uses_20250919", 3)
    assert counted.context_management.original_input_tokens == whole
    assert edit.cleared_input_tokens == whole - counted.input_tokens > 2000
    assert sum(split(message)) == sum(split(streamed)) == counted.input_tokens
    assert streamed.context_management == message.context_management
    assert api.requests[0]["messages"] == history  # the client's history is never changed, only what the model reads


async def test_clearing_waits_for_its_trigger_and_spares_what_it_is_told_to() -> None:
    history = long_tool_history(4)
    history[3]["content"][0]["content"] = "short"  # the second call's result is not worth clearing

    def clear(**options: Any) -> dict[str, Any]:
        return {"edits": [{"type": "clear_tool_uses_20250919", "keep": {"type": "tool_uses", "value": 0},
                           **options}]}

    cases = {"below its trigger": clear(),
             "once over three tool uses": clear(trigger={"type": "tool_uses", "value": 3}),
             "not the excluded tool's": clear(trigger={"type": "tool_uses", "value": 3}, exclude_tools=["read_file"]),
             "inputs too": clear(trigger={"type": "tool_uses", "value": 3}, clear_tool_inputs=True),
             "too little to clear": clear(trigger={"type": "tool_uses", "value": 3},
                                          clear_at_least={"type": "input_tokens", "value": 10_000})}
    async with asyncio.timeout(5), messages_api([turn(text("Ok.")) for _ in cases]) as api:
        async with client_for(api) as client:
            edits = {case: (await client.beta.messages.create(
                model=MODEL, max_tokens=10, messages=history, tools=[READ_FILE], context_management=config,
                betas=[EDITING])).context_management.applied_edits for case, config in cases.items()}
    assert edits["below its trigger"] == edits["not the excluded tool's"] == edits["too little to clear"] == []
    cleared, with_inputs = edits["once over three tool uses"][0], edits["inputs too"][0]
    assert cleared.cleared_tool_uses == with_inputs.cleared_tool_uses == 4
    assert 2000 < cleared.cleared_input_tokens < with_inputs.cleared_input_tokens < 10_000


async def test_context_management_without_its_beta_is_refused_as_an_unknown_field() -> None:
    clearing = {"edits": [{"type": "clear_tool_uses_20250919"}]}
    with pytest.raises(AssertionError, match="call 1 refused: context_management"):
        async with asyncio.timeout(5), messages_api([]) as api:
            async with client_for(api) as client:
                with pytest.raises(anthropic.BadRequestError) as refused:
                    await client.messages.create(model=MODEL, max_tokens=10, messages=ASK,
                                                 extra_body={"context_management": clearing})
    assert refused.value.body["error"]["message"] == "context_management: Extra inputs are not permitted"
    body = {"model": MODEL, "max_tokens": 10, "messages": ASK, "context_management": clearing}
    assert validate(body, betas={EDITING}) is None
    assert "keep.type" in validate({**body, "context_management": {"edits": [
        {"type": "clear_tool_uses_20250919", "keep": {"type": "input_tokens", "value": 1}}]}}, betas={EDITING})
