"""Authorizations, transactions and webhook events of the Stripe emulator.

Spawns ``$ROONY_BIN stripe-emulator`` with ``--webhook-url`` pointing at a small
Python HTTP server (the real-time authorization endpoint and the event endpoint),
checks every ``Stripe-Signature`` with the official ``stripe`` package
(``stripe.Webhook.construct_event``) for both rotation secrets, and validates
authorization, transaction, list and event bodies against the 2023-08-16 schemas.
"""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
import stripe

from test_emulator_openapi import CARDHOLDER, KEY, validate

SECRETS = ["whsec_python_old", "whsec_python_new"]


class Endpoint:
    """A webhook endpoint: records verified events, answers real-time requests."""

    def __init__(self):
        self.events = []
        self.bad = []
        self.approve = True
        self.lock = threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length", "0"))
                payload = self.rfile.read(length).decode("utf-8")
                header = self.headers.get("Stripe-Signature", "")
                try:
                    events = [
                        stripe.Webhook.construct_event(payload, header, secret)
                        for secret in SECRETS
                    ]
                except Exception as e:  # noqa: BLE001 - recorded for the assertion
                    with endpoint.lock:
                        endpoint.bad.append(repr(e))
                    self.send_response(400)
                    self.end_headers()
                    return
                event = json.loads(payload)
                assert events[0]["id"] == event["id"]
                with endpoint.lock:
                    endpoint.events.append(event)
                    approve = endpoint.approve
                if event["type"] == "issuing_authorization.request":
                    body = json.dumps(
                        {"approved": approve, "metadata": {"checked_by": "python"}}
                    ).encode()
                    self.send_response(200)
                    self.send_header("Stripe-Version", "2023-08-16")
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                else:
                    self.send_response(200)
                    self.send_header("Content-Length", "0")
                    self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def types(self):
        with self.lock:
            return [e["type"] for e in self.events]


@pytest.fixture(scope="module")
def endpoint():
    ep = Endpoint()
    yield ep
    ep.server.shutdown()


@pytest.fixture(scope="module")
def base_url(spawn_module, endpoint):
    args = ["stripe-emulator", "--listen", "127.0.0.1:0", "--webhook-url", endpoint.url]
    for s in SECRETS:
        args += ["--webhook-secret", s]
    _, url = spawn_module(args)
    return url


@pytest.fixture
def api(base_url, endpoint):
    requests.post(f"{base_url}/_emulator/reset", timeout=10).raise_for_status()
    with endpoint.lock:
        endpoint.events.clear()
        endpoint.approve = True
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {KEY}"

    def call(method, path, data=None, params=None, expect=200):
        resp = session.request(
            method, f"{base_url}{path}", data=data, params=params, timeout=10
        )
        assert resp.status_code == expect, (resp.status_code, resp.text)
        return resp.json()

    session.call = call
    session.base = base_url
    return session


def active_card(api):
    holder = api.call("POST", "/v1/issuing/cardholders", data=CARDHOLDER)
    return api.call(
        "POST",
        "/v1/issuing/cards",
        data={
            "cardholder": holder["id"],
            "currency": "usd",
            "type": "virtual",
            "status": "active",
            "spending_controls[blocked_categories][]": "betting_casino_gambling",
        },
    )


def wait_delivered(api):
    for _ in range(200):
        log = requests.get(f"{api.base}/_emulator/events", timeout=10).json()["data"]
        if all(e["delivered"] for e in log if not e["realtime"]):
            return log
        time.sleep(0.05)
    pytest.fail("events were not delivered")


def test_authorization_and_transaction_bodies_match_the_spec(api, endpoint):
    card = active_card(api)
    auth = api.call(
        "POST",
        "/v1/test_helpers/issuing/authorizations",
        data={
            "card": card["id"],
            "amount": 1240,
            "merchant_data[name]": "Namecheap",
            "merchant_data[category]": "computer_network_services",
            "merchant_data[country]": "US",
        },
    )
    validate("issuing.authorization", auth)
    assert auth["id"].startswith("iauth_")
    assert auth["approved"] is True and auth["status"] == "pending"
    assert auth["request_history"][-1]["reason"] == "webhook_approved"
    assert auth["metadata"] == {"checked_by": "python"}
    assert "number" not in auth["card"] and "cvc" not in auth["card"]

    captured = api.call(
        "POST", f"/v1/test_helpers/issuing/authorizations/{auth['id']}/capture"
    )
    validate("issuing.authorization", captured)
    assert captured["status"] == "closed"
    tx = captured["transactions"][0]
    validate("issuing.transaction", tx)
    assert tx["id"].startswith("ipi_") and tx["amount"] == -1240 and tx["type"] == "capture"

    refund = api.call(
        "POST",
        f"/v1/test_helpers/issuing/transactions/{tx['id']}/refund",
        data={"refund_amount": 240},
    )
    validate("issuing.transaction", refund)
    assert refund["amount"] == 240 and refund["type"] == "refund"
    forced = api.call(
        "POST",
        "/v1/test_helpers/issuing/transactions/create_force_capture",
        data={"card": card["id"], "amount": 100},
    )
    validate("issuing.transaction", forced)
    assert forced["authorization"] is None
    unlinked = api.call(
        "POST",
        "/v1/test_helpers/issuing/transactions/create_unlinked_refund",
        data={"card": card["id"], "amount": 50},
    )
    validate("issuing.transaction", unlinked)

    declined = api.call(
        "POST",
        "/v1/test_helpers/issuing/authorizations",
        data={
            "card": card["id"],
            "amount": 100,
            "merchant_data[category]": "betting_casino_gambling",
        },
    )
    validate("issuing.authorization", declined)
    assert declined["approved"] is False and declined["status"] == "closed"
    assert declined["request_history"][-1]["reason"] == "spending_controls"

    reversed_ = api.call(
        "POST",
        "/v1/test_helpers/issuing/authorizations",
        data={"card": card["id"], "amount": 300},
    )
    reversed_ = api.call(
        "POST",
        f"/v1/test_helpers/issuing/authorizations/{reversed_['id']}/reverse",
    )
    validate("issuing.authorization", reversed_)
    assert reversed_["status"] == "reversed"

    auths = api.call("GET", "/v1/issuing/authorizations", params={"card": card["id"]})
    validate("IssuingAuthorizationList", auths)
    assert len(auths["data"]) == 3
    txs = api.call("GET", "/v1/issuing/transactions", params={"type": "refund"})
    validate("IssuingTransactionList", txs)
    assert len(txs["data"]) == 2
    validate(
        "issuing.authorization",
        api.call("GET", f"/v1/issuing/authorizations/{auth['id']}"),
    )
    validate("issuing.transaction", api.call("GET", f"/v1/issuing/transactions/{tx['id']}"))
    err = api.call("GET", "/v1/issuing/authorizations/iauth_missing", expect=404)
    validate("error", err)


def test_events_are_signed_valid_and_in_order(api, endpoint):
    card = active_card(api)
    with endpoint.lock:
        endpoint.approve = False
    declined = api.call(
        "POST",
        "/v1/test_helpers/issuing/authorizations",
        data={"card": card["id"], "amount": 500},
    )
    assert declined["approved"] is False
    assert declined["request_history"][-1]["reason"] == "webhook_declined"
    with endpoint.lock:
        endpoint.approve = True
    auth = api.call(
        "POST",
        "/v1/test_helpers/issuing/authorizations",
        data={"card": card["id"], "amount": 700},
    )
    api.call("POST", f"/v1/test_helpers/issuing/authorizations/{auth['id']}/capture")
    log = wait_delivered(api)
    assert all(e["status"] == "delivered" for e in log)
    assert endpoint.bad == []
    # Real-time requests are sent synchronously, while the authorization is being decided;
    # regular events go out in creation order through the delivery queue. The two channels
    # are not ordered against each other (the card's `created` event may still be queued
    # when the first request goes out), so each is checked in its own order, and every
    # request must precede the `created` event of its authorization.
    types = endpoint.types()
    regular = [t for t in types if t != "issuing_authorization.request"]
    assert regular == [
        "issuing_cardholder.created",
        "issuing_card.created",
        "issuing_authorization.created",
        "issuing_authorization.created",
        "issuing_transaction.created",
        "issuing_authorization.updated",
    ], types
    with endpoint.lock:
        events = list(endpoint.events)
    requests = [e for e in events if e["type"] == "issuing_authorization.request"]
    created = [e for e in events if e["type"] == "issuing_authorization.created"]
    assert len(requests) == 2, types
    for req, made in zip(requests, created):
        assert req["data"]["object"]["id"] == made["data"]["object"]["id"]
        assert events.index(req) < events.index(made), types
    for event in events:
        validate("event", event)
        assert event["api_version"] and event["livemode"] is False
        assert "\"number\"" not in json.dumps(event)
    request = requests[0]["data"]["object"]
    validate("issuing.authorization", request)
    assert request["amount"] == 0 and request["pending_request"]["amount"] == 500
    validate("issuing.authorization", created[0]["data"]["object"])
    transaction = next(e for e in events if e["type"] == "issuing_transaction.created")
    validate("issuing.transaction", transaction["data"]["object"])
    assert events[7]["data"]["previous_attributes"]["status"] == "pending"


def test_webhook_control_api(api, endpoint):
    base = api.base
    current = requests.get(f"{base}/_emulator/webhooks", timeout=10).json()
    assert current["configured"] is True and current["url"] == endpoint.url
    assert len(current["secrets"]) == 2 and SECRETS[0] not in json.dumps(current)
    bad = requests.post(f"{base}/_emulator/webhooks", json={"url": "ftp://x"}, timeout=10)
    assert bad.status_code == 400
    requests.delete(f"{base}/_emulator/webhooks", timeout=10).raise_for_status()
    card = active_card(api)
    auth = api.call(
        "POST",
        "/v1/test_helpers/issuing/authorizations",
        data={"card": card["id"], "amount": 100},
    )
    assert auth["approved"] is True
    assert auth["request_history"][-1]["reason"] == "card_active"
    log = requests.get(f"{base}/_emulator/events", timeout=10).json()["data"]
    assert {e["status"] for e in log} == {"not_sent"}
    requests.post(f"{base}/_emulator/reset", timeout=10).raise_for_status()
    restored = requests.get(f"{base}/_emulator/webhooks", timeout=10).json()
    assert restored["configured"] is True
