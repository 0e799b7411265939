"""The scripted Messages API, driven by the real `anthropic` SDK."""

from __future__ import annotations

import asyncio
from typing import Any

import anthropic
import pytest

from tests.fakes.messages_api import MessagesAPI, http_error, messages_api, stream_error, text, tool_use, turn
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
