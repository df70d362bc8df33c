"""Proves the Python client drives the campus flow against the real server:
a transfer confirmed by the code from the mail, with its fee, and a redeem
held then accepted."""

import re

import pytest

from tally import Client, TallyError

from conftest import ADMIN_PASSWORD

PW = "correct horse battery"


def codes(mail):
    """Every code mailed so far, oldest first."""
    files = sorted(mail.iterdir(), key=lambda p: p.stat().st_mtime_ns)
    return [re.search(r"code is (\d{6})", p.read_text()).group(1) for p in files]


def test_campus_transfer_and_redeem(campus):
    addr, mail = campus
    with Client(*addr) as admin, Client(*addr) as sam, Client(*addr) as kim:
        admin.login("admin", ADMIN_PASSWORD)
        for c, user in ((sam, "sam"), (kim, "kim")):
            c.signup(user, user.title(), f"{user}@uni.example", PW, group="Y19")
            admin.set_events(user, 6)
            c.login(user, PW)
        admin.mint("sam", 500)

        pending = sam.transfer("kim", 100, memo="lunch")
        assert pending["delivered"] is True
        assert sam.balance()["balance"] == 500
        with pytest.raises(TallyError) as e:
            sam.confirm(pending["pending"], "000000" if codes(mail)[-1] != "000000" else "000001")
        assert e.value.code == "otp_invalid"
        t = sam.confirm(pending["pending"], codes(mail)[-1])
        assert (t["amount"], t["fee"]) == (100, 2)
        assert kim.balance()["balance"] == 98

        pending = sam.redeem("hoodie", 300)
        request = sam.confirm(pending["pending"], codes(mail)[-1])
        assert sam.balance() == {"account": "sam", "balance": 400, "held": 300, "available": 100}
        decided = admin.decide_redeem(request["request"], True, note="handed out")
        assert decided["status"] == "accepted"
        assert sam.balance() == {"account": "sam", "balance": 100, "held": 0, "available": 100}
        assert [r["status"] for r in sam.my_redeems()["requests"]] == ["accepted"]
        assert admin.audit()["sum"] == 0
