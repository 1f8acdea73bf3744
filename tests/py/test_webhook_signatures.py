"""The control plane verifies Stripe webhook signatures exactly as Stripe signs them.

Events are signed with the official ``stripe`` package (the way stripe-python's own tests
build the header: ``t=<ts>,v1=<WebhookSignature._compute_signature("<ts>.<payload>",
secret)>``) and posted to ``roony control-plane``'s ``/api/webhooks/stripe``.
"""

import json
import time

import requests
import stripe

SECRET = "whsec_python_test_secret_0123456789"
ROTATED = "whsec_python_test_rotated_abcdefgh"
ADMIN = "python-admin-token-0123456789abcdef"


def header(payload, secret, ts=None):
    ts = int(time.time()) if ts is None else ts
    sig = stripe.WebhookSignature._compute_signature("%d.%s" % (ts, payload), secret)
    return "t=%d,%s=%s" % (ts, stripe.WebhookSignature.EXPECTED_SCHEME, sig)


def event(kind, obj, event_id):
    return json.dumps(
        {
            "id": event_id,
            "object": "event",
            "api_version": "2026-09-30.endive",
            "created": int(time.time()),
            "data": {"object": obj},
            "livemode": False,
            "pending_webhooks": 1,
            "request": {"id": None, "idempotency_key": None},
            "type": kind,
        }
    )


def authorization_request():
    return {
        "id": "iauth_py_1",
        "object": "issuing.authorization",
        "amount": 0,
        "approved": False,
        "card": {"id": "ic_py_unknown", "object": "issuing.card", "metadata": {}, "status": "active"},
        "created": int(time.time()),
        "currency": "usd",
        "merchant_data": {"name": "Rocket Rides", "country": "US", "network_id": "1234567890",
                          "category": "taxicabs_limousines", "city": "San Francisco"},
        "pending_request": {"amount": 700, "currency": "usd", "is_amount_controllable": False},
        "request_history": [],
        "status": "pending",
    }


def test_signed_by_stripe_python_is_accepted_and_tampering_is_not(spawn, tmp_path):
    _, base = spawn(
        [
            "control-plane",
            "--listen", "127.0.0.1:0",
            "--data-dir", str(tmp_path),
            "--stripe-webhook-secret", SECRET,
            "--stripe-webhook-secret", ROTATED,
        ],
        env={"ROONY_ADMIN_TOKEN": ADMIN},
    )
    url = base + "/api/webhooks/stripe"
    payload = event("issuing_authorization.request", authorization_request(), "evt_py_1")
    # The SDK itself accepts the header we send (sanity check of the test).
    stripe.Webhook.construct_event(payload, header(payload, SECRET), SECRET)

    r = requests.post(url, data=payload, headers={"Stripe-Signature": header(payload, SECRET),
                                                  "Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    assert r.headers["Stripe-Version"] == "2026-09-30.endive"
    assert r.headers["Content-Type"] == "application/json"
    body = r.json()
    assert body["approved"] is False
    assert body["metadata"]["roony_reasons"] == "unknown_card"

    # The rotated secret signs too (an ordinary event).
    other = event("issuing_cardholder.updated", {"id": "ich_py"}, "evt_py_2")
    r = requests.post(url, data=other, headers={"Stripe-Signature": header(other, ROTATED)})
    assert r.status_code == 200, r.text
    assert r.json()["duplicate"] is False

    # Tampered body: 400.
    tampered = payload.replace('"amount": 700', '"amount": 7')
    assert tampered != payload
    r = requests.post(url, data=tampered, headers={"Stripe-Signature": header(payload, SECRET)})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_signature"
    # Another secret, a stale timestamp, no header.
    r = requests.post(url, data=payload, headers={"Stripe-Signature": header(payload, "whsec_other")})
    assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_signature")
    stale = int(time.time()) - 400
    r = requests.post(url, data=payload, headers={"Stripe-Signature": header(payload, SECRET, stale)})
    assert (r.status_code, r.json()["error"]["code"]) == (400, "stale_signature")
    r = requests.post(url, data=payload)
    assert (r.status_code, r.json()["error"]["code"]) == (400, "missing_signature")

    # The authorization was recorded once.
    r = requests.get(base + "/api/admin/v1/authorizations",
                     headers={"Authorization": "Bearer " + ADMIN})
    assert r.status_code == 200
    items = r.json()["items"]
    assert [a["id"] for a in items] == ["iauth_py_1"]
    assert items[0]["reasons"] == ["unknown_card"]
