"""Ctrl-C counting (mmbalance.interrupts): every press counts, even while the main thread sits in
one long C call, where CPython would run a Python SIGINT handler once for several presses."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time

from mmbalance.interrupts import INTERRUPTED_EXIT, CountedInterrupts

# The child holds its main thread in one C call (PBKDF2 releases the GIL and never runs Python
# handlers) for `busy_s` seconds, sized from a short calibration so the test does not depend on
# this machine's speed.
CHILD = textwrap.dedent("""
    import hashlib, sys, time
    from mmbalance.interrupts import CountedInterrupts

    busy_s, grace_s = float(sys.argv[1]), float(sys.argv[2])
    start = time.monotonic()
    hashlib.pbkdf2_hmac("sha256", b"k", b"s", 20000)
    rounds = int(20000 * busy_s / max(time.monotonic() - start, 1e-4))
    counter = CountedInterrupts(lambda: print("first press", flush=True), grace_s=grace_s, message="gave up")
    try:
        with counter:
            print("ready", flush=True)
            hashlib.pbkdf2_hmac("sha256", b"k", b"s", rounds)
            print(f"returned presses={counter.presses}", flush=True)
    except KeyboardInterrupt:
        print(f"keyboard interrupt presses={counter.presses}", flush=True)
        sys.exit(130)
    print(f"interrupted={counter.interrupted}", flush=True)
""")


def _run(busy_s: float, grace_s: float, presses: int, gap_s: float = 0.3):
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(busy_s), str(grace_s)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert child.stdout.readline().strip() == "ready"
    time.sleep(0.3)
    for i in range(presses):
        if i:
            time.sleep(gap_s)
        child.send_signal(signal.SIGINT)
    last = time.monotonic()
    out = child.communicate(timeout=120)[0]
    return child.returncode, out, time.monotonic() - last


def test_two_presses_during_one_c_call_are_two_presses():
    code, out, _ = _run(busy_s=4.0, grace_s=60.0, presses=2)
    lines = out.splitlines()
    assert code == 130, out
    # The first press was acted on while the main thread was still busy, the second became a
    # KeyboardInterrupt as soon as it ran Python again.
    assert lines[0] == "first press", out
    assert lines[-1] == "keyboard interrupt presses=2", out
    assert "returned" not in out


def test_one_press_lets_the_work_finish_and_is_remembered():
    code, out, _ = _run(busy_s=2.0, grace_s=60.0, presses=1)
    assert code == 0, out
    assert out.splitlines() == ["first press", "returned presses=1", "interrupted=True"], out


def test_a_main_thread_stuck_in_c_is_ended_after_the_grace_period():
    code, out, after_second = _run(busy_s=60.0, grace_s=1.0, presses=2)
    assert code == INTERRUPTED_EXIT, out
    assert out.splitlines()[-1] == "gave up", out
    assert after_second < 15, after_second  # 1 s grace, plus a loaded machine's scheduling


def test_a_third_press_exits_at_once():
    code, out, after_third = _run(busy_s=60.0, grace_s=60.0, presses=3)
    assert code == INTERRUPTED_EXIT, out
    assert "gave up" in out and after_third < 15, (after_third, out)


def test_leaving_the_block_restores_the_previous_handler_and_wakeup_fd():
    before = signal.getsignal(signal.SIGINT)
    with CountedInterrupts() as counter:
        assert signal.getsignal(signal.SIGINT) != before
    assert signal.getsignal(signal.SIGINT) is before
    assert signal.set_wakeup_fd(-1) == -1  # nothing left installed
    assert not counter.interrupted


def test_outside_the_main_thread_it_does_nothing():
    seen = {}

    def enter():
        with CountedInterrupts() as counter:
            seen["handler"] = signal.getsignal(signal.SIGINT)
            seen["interrupted"] = counter.interrupted

    before = signal.getsignal(signal.SIGINT)
    worker = threading.Thread(target=enter)
    worker.start()
    worker.join()
    assert seen == {"handler": before, "interrupted": False}
