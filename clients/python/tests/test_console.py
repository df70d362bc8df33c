"""The web console in a real browser (Debian's Chromium, driven by
Playwright) against the real binary: a student's transfer and redeem, each
confirmed with the mailed code, and an admin deciding the redeem; memos
holding markup shown as text; the token kept in memory only.
Screenshots go to target/console-*.png."""

import pathlib
import re
import shutil

import pytest
from playwright.sync_api import expect, sync_playwright

from conftest import ADMIN_PASSWORD, ROOT
from tally import Client

CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags Chromium keeps calling out to a
# network this machine does not have.
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
MEMO = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script> & lunch'
SHOTS = ROOT / "target"


@pytest.fixture()
def browser():
    assert shutil.which(CHROMIUM), "Chromium is needed: apt-get install chromium (.ci/run installs it)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        yield b
        b.close()


class Mail:
    """The codes the server mailed, oldest first."""

    def __init__(self, folder):
        self.folder = pathlib.Path(folder)
        self.seen = set()

    def next_code(self):
        def fresh():
            if not self.folder.exists():
                return []
            return sorted(p for p in self.folder.iterdir() if not p.name.startswith(".") and p not in self.seen)

        expect_within(lambda: fresh(), "a new mail")
        p = fresh()[0]
        self.seen.add(p)
        return re.search(r"code is (\d{6})", p.read_text()).group(1)


def expect_within(check, what, seconds=10):
    import time

    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"not within {seconds} s: {what}"
        time.sleep(0.05)


def open_console(browser, http):
    page = browser.new_page()
    errors = []
    # Script errors and refusals by the policy; failed calls (a 422 for a
    # wrong code) are the page working as meant.
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" and "Failed to load resource" not in m.text else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    response = page.goto(f"http://{http[0]}:{http[1]}/")
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp and "unsafe-inline" not in csp, csp
    return page, errors


def log_in(page, user, password):
    page.fill("#login-form input[name=user]", user)
    page.fill("#login-form input[name=password]", password)
    page.click("#login-form button")
    expect(page.locator("#who")).to_contain_text(user)


def confirm_with(page, code):
    expect(page.locator("#code-form")).to_be_visible()
    page.fill("#code-form input[name=otp]", code)
    page.click("#code-form button")
    expect(page.locator("#status")).to_contain_text("confirmed")


def test_a_student_pays_and_redeems_and_an_admin_decides(http_server, browser):
    plain, http, mail_folder = http_server
    mail = Mail(mail_folder)
    with Client(*plain) as admin:
        admin.login("admin", ADMIN_PASSWORD)
        for user in ("ann", "bob"):
            admin.call("create_user", user=user, role="user", name=user.title(),
                       email=f"{user}@campus.example", password=f"{user}-password")
        admin.mint("ann", 500)

    # The student: balance, a transfer confirmed with the mailed code.
    student, student_errors = open_console(browser, http)
    log_in(student, "ann", "ann-password")
    expect(student.locator("#balance")).to_have_text("500")
    student.fill("#transfer-form input[name=to]", "bob")
    student.fill("#transfer-form input[name=amount]", "150")
    student.fill("#transfer-form input[name=memo]", MEMO)
    student.click("#transfer-form button")
    confirm_with(student, mail.next_code())
    expect(student.locator("#balance")).to_have_text("350")
    first = student.locator("#history tbody tr").first
    expect(first.locator("td").nth(6)).to_have_text(MEMO)
    assert student.locator("#history img, #history script").count() == 0
    assert student.evaluate("window.__xss") is None

    # A redeem request, confirmed the same way, holds the amount.
    student.fill("#redeem-form input[name=item]", "hoodie")
    student.fill("#redeem-form input[name=amount]", "100")
    student.click("#redeem-form button")
    confirm_with(student, mail.next_code())
    expect(student.locator("#held")).to_have_text("100")
    expect(student.locator("#available")).to_have_text("250")
    expect(student.locator("#my-redeems tbody tr").first.locator("td").nth(3)).to_have_text("pending")
    student.screenshot(path=str(SHOTS / "console-student.png"), full_page=True)

    # A wrong code is refused and says so.
    student.fill("#transfer-form input[name=to]", "bob")
    student.fill("#transfer-form input[name=amount]", "100")
    student.click("#transfer-form button")
    code = mail.next_code()
    student.fill("#code-form input[name=otp]", "000000" if code != "000000" else "111111")
    student.click("#code-form button")
    expect(student.locator("#status")).to_contain_text("otp_invalid")
    expect(student.locator("#balance")).to_have_text("350")

    # The admin: the pending redeem, accepted; search, mint, audit, the chart.
    admin, admin_errors = open_console(browser, http)
    log_in(admin, "admin", ADMIN_PASSWORD)
    row = admin.locator("#redeems tbody tr").filter(has_text="hoodie")
    expect(row.locator("td").nth(1)).to_have_text("ann")
    row.get_by_role("button", name="Accept").click()
    expect(admin.locator("#status")).to_contain_text("accepted")
    expect(admin.locator("#redeems tbody tr")).to_have_count(0)
    admin.fill("#search-form input[name=balance_min]", "100")
    admin.fill("#search-form input[name=balance_max]", "1000")
    admin.click("#search-form button")
    # ann 250, bob 150, and the accepted hoodie's 100 in @redeemed.
    expect(admin.locator("#accounts tbody tr td:first-child")).to_have_text(["@redeemed", "ann", "bob"])
    admin.fill("#mint-form input[name=to]", "bob")
    admin.fill("#mint-form input[name=amount]", "5")
    admin.click("#mint-form button")
    expect(admin.locator("#status")).to_contain_text("Minted 5 to bob")
    admin.click("#audit-run")
    expect(admin.locator("#audit")).to_contain_text('"chain_ok": true')
    expect(admin.locator("#audit")).to_contain_text('"sum": 0')
    expect(admin.locator("#rate")).to_have_text(re.compile(r"^\d+$"))
    admin.screenshot(path=str(SHOTS / "console-admin.png"), full_page=True)

    # The student sees the decision; a reload forgets the token (it lived
    # only in the page's memory, never in a cookie or storage).
    assert student.evaluate("document.cookie") == ""
    assert student.evaluate("localStorage.length + sessionStorage.length") == 0
    student.reload()
    expect(student.locator("#login-view")).to_be_visible()
    log_in(student, "ann", "ann-password")
    expect(student.locator("#my-redeems tbody tr").first.locator("td").nth(3)).to_have_text("accepted")
    expect(student.locator("#held")).to_have_text("0")
    expect(student.locator("#balance")).to_have_text("250")
    assert student_errors == [] and admin_errors == [], (student_errors, admin_errors)
