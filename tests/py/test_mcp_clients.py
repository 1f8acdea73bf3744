"""The sidecar's MCP interface driven by the official Python MCP SDK (PyPI ``mcp``).

Every scenario runs over both transports — stdio (``roony mcp``, which forwards to the
running sidecar) and streamable HTTP (``/mcp``) — and both protocol eras: 2026-07-28
(``mode="auto"`` negotiates it) and 2025-11-25 (``mode="legacy"``, the initialize
handshake). The sidecar is a real ``roony dev`` (emulator + sidecar) per test module.
"""

import asyncio
import os
import uuid

import httpx2
import jsonschema
import pytest
import requests
from mcp import Client, StdioServerParameters
from mcp import types
from mcp.client.streamable_http import streamable_http_client

from conftest import start_dev

AGENT_KEY = "roony-mcp-test-key-0123456789"
TRANSPORTS = ["stdio", "http"]
MODES = ["auto", "legacy"]
EXPECTED_PROTOCOL = {"auto": "2026-07-28", "legacy": "2025-11-25"}


@pytest.fixture(scope="module")
def sidecar(spawn_module, tmp_path_factory):
    # One agent makes every purchase of this module in a few seconds: rate limits and risk
    # scores have their own tests (tests/ratelimit.rs, tests/risk.rs), so the limiter is off
    # and each purchase goes to its own merchant (see `purchase`).
    no_limits = {
        "ROONY_RATE_LIMIT_PER_SECOND": "0",
        "ROONY_UNAUTHENTICATED_RATE_LIMIT_PER_SECOND": "0",
    }
    return start_dev(spawn_module, tmp_path_factory.mktemp("roony-mcp"), AGENT_KEY, env=no_limits)[1]


def client(transport, mode, sidecar, roony_bin, elicitation_callback=None, key=AGENT_KEY):
    if transport == "stdio":
        server = StdioServerParameters(
            command=roony_bin,
            args=["mcp"],
            env={**os.environ, "ROONY_AGENT_KEY": key, "ROONY_SIDECAR_URL": sidecar, "RUST_LOG": "warn"},
        )
    else:
        http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=30)
        server = streamable_http_client(f"{sidecar}/mcp", http_client=http)
    return Client(server, mode=mode, elicitation_callback=elicitation_callback)


def purchase(amount, **extra):
    # A merchant of its own per purchase: many USD 80 purchases at one merchant within
    # minutes are a split purchase, which the risk score rightly declines.
    shop = uuid.uuid4().hex[:8]
    body = {
        "amount": amount,
        "currency": "usd",
        "merchant": {"name": f"Namecheap {shop}", "url": f"https://{shop}.namecheap.example", "country": "US"},
        "description": "register a domain for one year",
        "idempotency_key": str(uuid.uuid4()),
    }
    body.update(extra)
    return body


def check_output(tools, name, result):
    """structuredContent validates against the tool's outputSchema (the SDK checks too)."""
    schema = next(t for t in tools.tools if t.name == name).output_schema
    assert schema, f"{name} has no outputSchema"
    jsonschema.validate(result.structured_content, schema)


def luhn(number):
    digits = [int(c) for c in number]
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2 == 1:
            d = d * 2 - 9 if d * 2 > 9 else d * 2
        total += d
    return total % 10 == 0


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=60))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_buy_decline_budget_cancel(transport, mode, sidecar, roony_bin):
    async def scenario():
        async with client(transport, mode, sidecar, roony_bin) as c:
            assert c.protocol_version == EXPECTED_PROTOCOL[mode]
            tools = await c.list_tools()
            names = sorted(t.name for t in tools.tools)
            assert names == ["cancel_purchase", "get_budget", "get_purchase", "list_purchases", "request_purchase"]
            by_name = {t.name: t for t in tools.tools}
            assert by_name["get_budget"].annotations.read_only_hint is True
            assert by_name["request_purchase"].annotations.open_world_hint is True
            assert by_name["request_purchase"].annotations.idempotent_hint is False
            assert by_name["cancel_purchase"].annotations.destructive_hint is True

            before = await c.call_tool("get_budget", {})
            assert not before.is_error
            check_output(tools, "get_budget", before)
            left_before = before.structured_content["budgets"][0]["remaining"]

            # Within policy: a card comes back.
            bought = await c.call_tool("request_purchase", purchase(1200))
            assert not bought.is_error, bought.content
            check_output(tools, "request_purchase", bought)
            sc = bought.structured_content
            assert sc["status"] == "approved"
            assert luhn(sc["card"]["number"]) and len(sc["card"]["cvc"]) == 3
            assert "Approved" in bought.content[0].text

            # Declined with reasons the model can act on.
            declined = await c.call_tool(
                "request_purchase",
                purchase(2500, merchant={"name": "Lucky Casino", "url": "https://luckycasino.example", "category": "betting_casino_gambling"}),
            )
            assert declined.is_error is True
            assert declined.structured_content["status"] == "declined"
            assert [r["code"] for r in declined.structured_content["reasons"]] == ["category_not_allowed"]
            assert "betting_casino_gambling" in declined.content[0].text

            too_much = await c.call_tool("request_purchase", purchase(20000))
            assert too_much.is_error is True
            assert "exceeds_transaction_limit" in too_much.content[0].text
            assert "USD 100.00" in too_much.content[0].text

            # Budget went down by the card's limit.
            after = await c.call_tool("get_budget", {})
            assert after.structured_content["budgets"][0]["remaining"] == left_before - sc["card"]["spending_limit"]

            got = await c.call_tool("get_purchase", {"id": sc["id"]})
            check_output(tools, "get_purchase", got)
            assert got.structured_content["status"] == "approved"
            assert "number" not in got.structured_content["card"]

            page = await c.call_tool("list_purchases", {"limit": 2})
            check_output(tools, "list_purchases", page)
            assert len(page.structured_content["data"]) == 2
            assert page.structured_content["data"][0]["id"] == too_much.structured_content["id"]
            assert page.structured_content["has_more"] is True

            canceled = await c.call_tool("cancel_purchase", {"id": sc["id"]})
            assert not canceled.is_error, canceled.content
            check_output(tools, "cancel_purchase", canceled)
            assert canceled.structured_content["status"] == "canceled"
            restored = await c.call_tool("get_budget", {})
            assert restored.structured_content["budgets"][0]["remaining"] == left_before

            # Bad arguments are tool errors, not protocol crashes.
            bad = await c.call_tool("request_purchase", {"amount": -1, "currency": "usd", "merchant": {"name": "x"}, "description": "d"})
            assert bad.is_error is True
            assert "invalid_amount" in bad.content[0].text
            missing = await c.call_tool("get_purchase", {})
            assert missing.is_error is True
            unknown = await c.call_tool("get_purchase", {"id": "pur_nope"})
            assert unknown.is_error is True and "intent_not_found" in unknown.content[0].text

    run(scenario())


def approve_with(answer):
    seen = []

    async def callback(context, params):
        seen.append(params)
        if answer is None:
            return types.ElicitResult(action="decline")
        return types.ElicitResult(action="accept", content={"approve": answer})

    return callback, seen


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_human_confirms_above_threshold(transport, mode, sidecar, roony_bin):
    """USD 80 is above the demo's USD 50 confirmation threshold: the human is asked."""

    async def scenario():
        callback, seen = approve_with(True)
        async with client(transport, mode, sidecar, roony_bin, elicitation_callback=callback) as c:
            args = purchase(8000)
            r = await c.call_tool("request_purchase", args)
            assert not r.is_error, r.content
            assert r.structured_content["status"] == "approved"
            assert luhn(r.structured_content["card"]["number"])
            assert len(seen) == 1
            message = seen[0].message
            assert "USD 80.00" in message and "Namecheap" in message
            # Only a yes/no is asked — never card data.
            assert set(seen[0].requested_schema["properties"]) == {"approve"}
            # A retry with the same idempotency key replays the purchase without asking again.
            again = await c.call_tool("request_purchase", args)
            assert again.structured_content["id"] == r.structured_content["id"]
            assert len(seen) == 1
            await c.call_tool("cancel_purchase", {"id": r.structured_content["id"]})

    run(scenario())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("answer", [False, None])
def test_human_refuses(answer, mode, sidecar, roony_bin):
    async def scenario():
        callback, seen = approve_with(answer)
        async with client("http", mode, sidecar, roony_bin, elicitation_callback=callback) as c:
            r = await c.call_tool("request_purchase", purchase(8000))
            assert r.is_error is True
            assert r.structured_content["status"] == "declined"
            assert [x["code"] for x in r.structured_content["reasons"]] == ["confirmation_declined"]
            assert len(seen) == 1

    run(scenario())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_client_without_elicitation_gets_pending_approval(transport, mode, sidecar, roony_bin):
    async def scenario():
        async with client(transport, mode, sidecar, roony_bin) as c:
            r = await c.call_tool("request_purchase", purchase(8000))
            assert not r.is_error, r.content
            assert r.structured_content["status"] == "pending_approval"
            assert [x["code"] for x in r.structured_content["reasons"]] == ["confirmation_required"]
            assert "card" not in r.structured_content
            await c.call_tool("cancel_purchase", {"id": r.structured_content["id"]})

    run(scenario())


def test_confirmation_state_is_tamper_proof_and_single_use(sidecar, roony_bin):
    """Drive the 2026-07-28 round trip by hand: a forged, altered or reused requestState
    never buys anything new."""

    async def scenario():
        async with client("http", "auto", sidecar, roony_bin, elicitation_callback=approve_with(True)[0]) as c:
            args = purchase(7000)
            first = await c.session.call_tool("request_purchase", args, allow_input_required=True)
            assert first.result_type == "input_required", first
            state = first.request_state
            assert "confirm" in first.input_requests
            accept = {"confirm": {"action": "accept", "content": {"approve": True}}}

            forged = await c.session.call_tool(
                "request_purchase", args, allow_input_required=True,
                input_responses=accept, request_state=state[:-4] + ("AAAA" if not state.endswith("AAAA") else "BBBB"),
            )
            assert forged.is_error is True and "confirmation_invalid" in forged.content[0].text

            other = dict(args, amount=6900)
            swapped = await c.session.call_tool(
                "request_purchase", other, allow_input_required=True, input_responses=accept, request_state=state
            )
            assert swapped.is_error is True and "confirmation_mismatch" in swapped.content[0].text

            ok = await c.session.call_tool(
                "request_purchase", args, allow_input_required=True, input_responses=accept, request_state=state
            )
            assert ok.is_error is False and ok.structured_content["status"] == "approved"
            again = await c.session.call_tool(
                "request_purchase", dict(args, idempotency_key=str(uuid.uuid4())), allow_input_required=True,
                input_responses=accept, request_state=state,
            )
            assert again.structured_content["id"] == ok.structured_content["id"], "the state bought only once"
            page = await c.call_tool("list_purchases", {"limit": 100})
            ids = [p["id"] for p in page.structured_content["data"]]
            assert ids.count(ok.structured_content["id"]) == 1
            await c.call_tool("cancel_purchase", {"id": ok.structured_content["id"]})

    run(scenario())


def test_http_requires_the_agent_key(sidecar):
    r = requests.post(f"{sidecar}/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, timeout=10)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "missing_agent_key"
    r = requests.post(
        f"{sidecar}/mcp",
        json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
        headers={"Authorization": "Bearer wrong-key-0123456789abcdef"},
        timeout=10,
    )
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_agent_key"
    # DNS-rebinding protection: an unexpected Host is refused even with a valid key.
    r = requests.post(
        f"{sidecar}/mcp",
        json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
        headers={"Authorization": f"Bearer {AGENT_KEY}", "Host": "evil.example", "Accept": "application/json, text/event-stream"},
        timeout=10,
    )
    assert r.status_code == 403


def test_stdio_fails_clearly(roony_bin, sidecar):
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "ROONY_AGENT_KEY"}
    r = subprocess.run([roony_bin, "mcp"], env=env, input="", capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "ROONY_AGENT_KEY" in r.stderr
    r = subprocess.run(
        [roony_bin, "mcp"], env={**env, "ROONY_AGENT_KEY": AGENT_KEY, "ROONY_SIDECAR_URL": "http://127.0.0.1:9"},
        input="", capture_output=True, text=True, timeout=30,
    )
    assert r.returncode != 0 and "cannot reach the Roony sidecar" in r.stderr
    r = subprocess.run(
        [roony_bin, "mcp"], env={**env, "ROONY_AGENT_KEY": "not-the-key-0123456789", "ROONY_SIDECAR_URL": sidecar},
        input="", capture_output=True, text=True, timeout=30,
    )
    assert r.returncode != 0 and "rejected the agent key" in r.stderr
