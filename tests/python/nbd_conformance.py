#!/usr/bin/python3
"""NBD protocol conformance checks of one server, driven with libnbd.

Run with /usr/bin/python3 (the interpreter that can import Debian's python3-libnbd):

    /usr/bin/python3 tests/python/nbd_conformance.py --uri URI [--ro-uri URI]
        [--direct-uri URI] [--exports a,b,c] [--blkrep]

--uri must name a fresh, writable export of at least 16 MiB whose upper half has
never been written (the dirty-map checks rely on it). Without --blkrep only checks
that any conforming server passes are run (useful against qemu-nbd to debug this
script); with --blkrep the blkrep contract is checked as well (x-blkrep:dirty and
its alias, multi-conn, TRIM reading back as zeroes, sparse images reporting holes).

Every check prints PASS/FAIL/SKIP and the last line is "N passed, M failed, K skipped".
Exit status is 0 only if nothing failed and something passed.
"""

import argparse
import errno
import os
import random
import sys
import time
import traceback

import nbd

EINVAL = errno.EINVAL
ENOSPC = errno.ENOSPC
EPERM = errno.EPERM
EOVERFLOW = errno.EOVERFLOW
ENOTSUP = errno.ENOTSUP

DIRTY = "x-blkrep:dirty"
DIRTY_ALIAS = "qemu:dirty-bitmap:blkrep"
BASE = nbd.CONTEXT_BASE_ALLOCATION  # "base:allocation"
BLOCK = 4096

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--uri", required=True, help="fresh writable export (>= 16 MiB)")
ap.add_argument("--ro-uri", help="read-only export")
ap.add_argument("--direct-uri", help="writable export opened with O_DIRECT")
ap.add_argument("--exports", default="", help="comma-separated names NBD_OPT_LIST must return")
ap.add_argument("--blkrep", action="store_true", help="also check blkrep-specific behaviour")
ap.add_argument("--seed", type=int, default=1)
ap.add_argument("--dirty-context", default=DIRTY, help=argparse.SUPPRESS)  # to debug against qemu-nbd -B
args = ap.parse_args()
DIRTY = args.dirty_context

random.seed(args.seed)
RESULTS = {"pass": [], "fail": [], "skip": []}


class Skip(Exception):
    pass


def check(fn):
    """Runs one check function and records its outcome."""
    name = fn.__name__
    try:
        fn()
    except Skip as e:
        RESULTS["skip"].append(name)
        print(f"SKIP {name}: {e}", flush=True)
    except Exception:  # noqa: BLE001 - report everything
        RESULTS["fail"].append(name)
        print(f"FAIL {name}:", flush=True)
        traceback.print_exc(file=sys.stdout)
        sys.stdout.flush()
    else:
        RESULTS["pass"].append(name)
        print(f"PASS {name}", flush=True)
    return fn


def connect(uri, contexts=(BASE,), strict=True, structured=True, opt_mode=False):
    h = nbd.NBD()
    h.set_handle_name("conformance")
    if not strict:
        h.set_strict_mode(0)
    h.set_request_structured_replies(structured)
    for c in contexts:
        h.add_meta_context(c)
    if opt_mode:
        h.set_opt_mode(True)
    h.connect_uri(uri)
    return h


def expect_error(what, fn, allowed):
    """fn() must raise nbd.Error with errnum in `allowed`."""
    try:
        fn()
    except nbd.Error as e:
        if e.errnum not in allowed:
            names = [errno.errorcode.get(a, str(a)) for a in allowed]
            raise AssertionError(f"{what}: failed with {e.errno or e.errnum} ({e.string}); expected one of {names}")
        return e.errnum
    raise AssertionError(f"{what}: succeeded, expected an error")


def alive(h, what):
    """The connection must still serve a read after an error."""
    n = max(512, h.get_block_size(nbd.SIZE_MINIMUM))
    try:
        buf = h.pread(n, 0)
    except nbd.Error as e:
        raise AssertionError(f"connection unusable after {what}: {e}")
    assert len(buf) == n, f"short read after {what}"
    assert h.aio_is_ready(), f"handle not ready after {what} (state {h.connection_state()})"


def rand_bytes(n):
    return os.urandom(n)


def extents(h, count, offset, flags=0):
    """block_status -> {context: [(length, flags), ...]}"""
    got = {}

    def cb(metacontext, off, entries, err):
        assert off == offset, f"extent callback for offset {off}, asked {offset}"
        pairs = list(zip(entries[0::2], entries[1::2]))
        assert metacontext not in got, f"context {metacontext} answered twice"
        got[metacontext] = pairs
        return 0

    h.block_status(count, offset, cb, flags)
    return got


def check_extent_shape(ctx, pairs, offset, count, size, req_one=False):
    assert pairs, f"{ctx}: no extents at {offset}"
    total = 0
    for length, _flags in pairs:
        assert length > 0, f"{ctx}: zero-length extent in {pairs}"
        total += length
    assert offset + total <= size, f"{ctx}: extents run past the end of the export: {offset}+{total} > {size}"
    if req_one:
        assert len(pairs) == 1, f"{ctx}: REQ_ONE answered with {len(pairs)} extents: {pairs}"
        assert pairs[0][0] <= count, f"{ctx}: REQ_ONE extent {pairs[0][0]} longer than the request {count}"
    return total


def map_context(h, ctx, start, end):
    """Walk block_status over [start, end) -> list of (off, len, flags) for ctx."""
    out = []
    off = start
    size = h.get_size()
    while off < end:
        count = min(end - off, 64 * 1024 * 1024)
        got = extents(h, count, off)
        assert ctx in got, f"no {ctx} extents for {off}+{count} (got {list(got)})"
        total = check_extent_shape(ctx, got[ctx], off, count, size)
        o = off
        for length, flags in got[ctx]:
            if o >= end:
                break
            ln = min(length, end - o)
            out.append((o, ln, flags))
            o += ln
        off = off + min(total, count)
    return out


def flags_at(mapping, off):
    for o, ln, fl in mapping:
        if o <= off < o + ln:
            return fl
    raise AssertionError(f"offset {off} not covered by {mapping}")


# ---------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------

def probe_size():
    h = connect(args.uri)
    size = h.get_size()
    h.shutdown()
    return size


SIZE = probe_size()
assert SIZE >= 16 * 1024 * 1024, f"--uri export must be at least 16 MiB (is {SIZE})"
# Upper half: reserved for the dirty-map checks (never written by anything else).
RESERVED = SIZE // 2


@check
def negotiation_opt_mode():
    h = connect(args.uri, contexts=(), opt_mode=True)
    assert h.aio_is_negotiating(), "opt_mode connection is not negotiating"
    names = []
    n = h.opt_list(lambda name, desc: names.append(name) or 0)
    assert n == len(names), f"opt_list returned {n} but called back {len(names)} times"
    expected = [e for e in args.exports.split(",") if e]
    for e in expected:
        assert e in names, f"NBD_OPT_LIST lacks export {e!r}: {names}"
    assert len(set(names)) == len(names), f"NBD_OPT_LIST repeats names: {names}"

    h.opt_info()
    assert h.get_size() == SIZE, f"opt_info size {h.get_size()} != {SIZE}"
    assert not h.is_read_only(), "writable export reported read-only by NBD_OPT_INFO"
    assert h.aio_is_negotiating(), "still negotiating after opt_info"

    ctxs = []
    h.opt_list_meta_context(lambda name: ctxs.append(name) or 0)
    assert BASE in ctxs, f"NBD_OPT_LIST_META_CONTEXT (all) lacks {BASE}: {ctxs}"
    if args.blkrep:
        assert DIRTY in ctxs, f"NBD_OPT_LIST_META_CONTEXT (all) lacks {DIRTY}: {ctxs}"

    h.add_meta_context(BASE)
    ctxs = []
    h.opt_list_meta_context(lambda name: ctxs.append(name) or 0)
    assert ctxs == [BASE], f"query {BASE!r} listed {ctxs}"

    h.clear_meta_contexts()
    h.add_meta_context("x-no-such-namespace:thing")
    ctxs = []
    h.opt_list_meta_context(lambda name: ctxs.append(name) or 0)
    assert ctxs == [], f"query for an unknown context listed {ctxs}"

    if args.blkrep:
        h.clear_meta_contexts()
        h.add_meta_context("x-blkrep:")
        ctxs = []
        h.opt_list_meta_context(lambda name: ctxs.append(name) or 0)
        assert DIRTY in ctxs, f"prefix query 'x-blkrep:' does not list {DIRTY}: {ctxs}"
        h.clear_meta_contexts()
        h.add_meta_context(DIRTY_ALIAS)
        ctxs = []
        h.opt_list_meta_context(lambda name: ctxs.append(name) or 0)
        assert ctxs == [DIRTY_ALIAS], f"query {DIRTY_ALIAS!r} listed {ctxs}"

    # NBD_OPT_SET_META_CONTEXT: libnbd >= 1.16 has opt_set_meta_context; older
    # versions send it as part of opt_go for the contexts added.
    h.clear_meta_contexts()
    h.add_meta_context(BASE)
    if args.blkrep:
        h.add_meta_context(DIRTY)
    if hasattr(h, "opt_set_meta_context"):
        n = h.opt_set_meta_context(lambda name: 0)
        assert n == (2 if args.blkrep else 1), f"opt_set_meta_context selected {n} contexts"
    h.opt_go()
    assert h.aio_is_ready(), "not in transmission after opt_go"
    assert h.can_meta_context(BASE), f"{BASE} not negotiated"
    if args.blkrep:
        assert h.can_meta_context(DIRTY), f"{DIRTY} not negotiated"
    assert h.get_size() == SIZE
    h.pread(4096, 0)
    h.shutdown()


@check
def negotiation_unknown_export():
    h = connect(args.uri, contexts=(), opt_mode=True)
    real = h.get_export_name()
    h.set_export_name("no-such-export-xyz")
    expect_error("NBD_OPT_INFO of an unknown export", h.opt_info, allowed=range(0, 1 << 16))
    assert h.aio_is_negotiating(), "NBD_OPT_INFO error ended the negotiation"
    expect_error("NBD_OPT_GO of an unknown export", h.opt_go, allowed=range(0, 1 << 16))
    assert h.aio_is_negotiating(), "NBD_OPT_GO error ended the negotiation"
    h.set_export_name(real)
    h.opt_go()
    assert h.aio_is_ready()
    h.pread(512, 0)
    h.shutdown()

    # Without option mode the connect itself must fail.
    h = nbd.NBD()
    uri = args.uri.replace(f"/{real}", "/no-such-export-xyz", 1)
    assert uri != args.uri, "cannot derive an unknown-export URI"
    expect_error("connect to an unknown export", lambda: h.connect_uri(uri), allowed=range(0, 1 << 16))


@check
def negotiation_opt_abort():
    h = connect(args.uri, contexts=(), opt_mode=True)
    h.opt_abort()
    assert h.aio_is_closed() or h.aio_is_dead(), f"state after opt_abort: {h.connection_state()}"


@check
def structured_replies_off():
    h = connect(args.uri, contexts=(BASE,), structured=False)
    assert not h.get_structured_replies_negotiated(), "structured replies negotiated although not requested"
    assert not h.can_meta_context(BASE), "meta context negotiated without structured replies"
    data = rand_bytes(65536)
    h.pwrite(data, 1 << 20)
    assert h.pread(65536, 1 << 20) == data, "read back mismatch with simple replies"
    # errors with simple replies
    h.set_strict_mode(0)
    expect_error("read past the end (simple reply)", lambda: h.pread(4096, SIZE), {EINVAL})
    alive(h, "read past the end with simple replies")
    h.shutdown()


@check
def structured_replies_on():
    h = connect(args.uri)
    assert h.get_structured_replies_negotiated(), "structured replies not negotiated"
    assert h.can_meta_context(BASE)
    h.shutdown()


@check
def flags_advertised():
    h = connect(args.uri)
    for f in ("can_flush", "can_fua", "can_trim", "can_zero"):
        assert getattr(h, f)(), f"{f} is false"
    assert not h.is_read_only()
    print(f"     info: can_cache={h.can_cache()} can_fast_zero={h.can_fast_zero()} can_df={h.can_df()} "
          f"can_multi_conn={h.can_multi_conn()} block sizes min/pref/max="
          f"{h.get_block_size(nbd.SIZE_MINIMUM)}/{h.get_block_size(nbd.SIZE_PREFERRED)}/{h.get_block_size(nbd.SIZE_MAXIMUM)}")
    if args.blkrep:
        assert h.can_multi_conn(), "blkrep advertises multi-conn, but can_multi_conn is false"
    h.shutdown()


@check
def read_write_flush_fua():
    h = connect(args.uri)
    off = 2 << 20
    data = rand_bytes(256 * 1024)
    h.pwrite(data, off)
    assert h.pread(len(data), off) == data
    h.flush()
    d2 = rand_bytes(8192)
    h.pwrite(d2, off + 4096, nbd.CMD_FLAG_FUA)
    assert h.pread(8192, off + 4096) == d2
    assert h.pread(4096, off) == data[:4096]
    h.flush()
    h.shutdown()
    # FUA is valid on every command once SEND_FUA was advertised; the server MUST
    # accept it on a read (libnbd only sends it with strict mode off).
    h = connect(args.uri, strict=False)
    assert h.pread(4096, off, nbd.CMD_FLAG_FUA) == data[:4096]
    h.shutdown()


@check
def write_zeroes_variants():
    h = connect(args.uri)
    off = 3 << 20
    for flags, name in ((0, "plain"), (nbd.CMD_FLAG_NO_HOLE, "NO_HOLE"), (nbd.CMD_FLAG_FUA, "FUA"),
                        (nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA, "NO_HOLE|FUA")):
        h.pwrite(b"\xa5" * 65536, off)
        h.zero(65536 - 8192, off + 4096, flags)
        got = h.pread(65536, off)
        assert got[:4096] == b"\xa5" * 4096, f"zero ({name}) touched bytes before its range"
        assert got[4096:65536 - 4096] == bytes(65536 - 8192), f"zero ({name}) did not zero its range"
        assert got[-4096:] == b"\xa5" * 4096, f"zero ({name}) touched bytes after its range"
    # unaligned zero (within one block)
    h.pwrite(b"\x5a" * 4096, off)
    h.zero(100, off + 10)
    got = h.pread(4096, off)
    assert got == b"\x5a" * 10 + bytes(100) + b"\x5a" * (4096 - 110), "unaligned zero wrong"
    h.shutdown()


@check
def write_zeroes_fast():
    h = connect(args.uri)
    if not h.can_fast_zero():
        raise Skip("server does not advertise NBD_FLAG_SEND_FAST_ZERO")
    off = 4 << 20
    h.pwrite(b"\x77" * 65536, off)
    try:
        h.zero(65536, off, nbd.CMD_FLAG_FAST_ZERO)
    except nbd.Error as e:
        assert e.errnum == ENOTSUP, f"FAST_ZERO failed with {e.errno} (only ENOTSUP allowed)"
        print("     info: FAST_ZERO refused with ENOTSUP")
    else:
        assert h.pread(65536, off) == bytes(65536), "FAST_ZERO succeeded but the range is not zero"
    alive(h, "FAST_ZERO")
    h.shutdown()


@check
def trim_and_cache():
    h = connect(args.uri)
    off = 5 << 20
    h.pwrite(b"\x3c" * 131072, off)
    h.trim(65536, off + 32768)
    got = h.pread(131072, off)
    assert got[:32768] == b"\x3c" * 32768 and got[-32768:] == b"\x3c" * 32768, "TRIM touched bytes outside its range"
    if args.blkrep:
        # blkrep's BlockDevice contract: a trimmed range reads as zeroes.
        assert got[32768:98304] == bytes(65536), "trimmed range does not read as zeroes"
    h.trim(4096, off, nbd.CMD_FLAG_FUA)
    if h.can_cache():
        h.cache(65536, off)
        h.cache(1 << 20, SIZE - (1 << 20))
    elif args.blkrep:
        raise AssertionError("blkrep does not advertise NBD_FLAG_SEND_CACHE")
    h.shutdown()


@check
def block_status_base_allocation():
    h = connect(args.uri)
    off = 6 << 20
    h.pwrite(rand_bytes(65536), off)
    got = extents(h, 1 << 20, off)
    assert BASE in got, f"no {BASE} extents: {got}"
    check_extent_shape(BASE, got[BASE], off, 1 << 20, SIZE)
    first_len, first_flags = got[BASE][0]
    assert not (first_flags & nbd.STATE_HOLE) or first_len == 0, \
        f"freshly written data at {off} reported as a hole: {got[BASE]}"
    assert not (first_flags & nbd.STATE_ZERO), f"random data at {off} reported as zero: {got[BASE]}"
    # REQ_ONE
    got = extents(h, 1 << 20, off, nbd.CMD_FLAG_REQ_ONE)
    check_extent_shape(BASE, got[BASE], off, 1 << 20, SIZE, req_one=True)
    # last block of the export
    got = extents(h, 4096, SIZE - 4096)
    check_extent_shape(BASE, got[BASE], SIZE - 4096, 4096, SIZE)
    if args.blkrep:
        # sparse image: the never-written upper half must show as hole+zero
        # somewhere (the harness creates the image with set_len).
        m = map_context(h, BASE, RESERVED, SIZE)
        holes = [e for e in m if e[2] & nbd.STATE_HOLE]
        assert holes, f"sparse, never-written range [{RESERVED},{SIZE}) reported without holes: {m[:8]}"
        for o, ln, fl in holes:
            assert fl & nbd.STATE_ZERO, f"hole at {o}+{ln} without STATE_ZERO (flags {fl})"
    h.shutdown()


@check
def pread_structured_chunks():
    h = connect(args.uri)
    off = 7 << 20
    data = rand_bytes(65536)
    h.pwrite(data, off)
    h.zero(65536, off + 65536)
    chunks = []

    def cb(subbuf, offset, status, err):
        chunks.append((offset, len(subbuf), status, bytes(subbuf)))
        return 0

    buf = h.pread_structured(131072, off, cb)
    assert buf == data + bytes(65536), "pread_structured data mismatch"
    covered = sorted((o, n) for o, n, st, _ in chunks if st in (nbd.READ_DATA, nbd.READ_HOLE))
    pos = off
    for o, n in covered:
        assert o == pos, f"chunks overlap or leave a gap at {pos}: {covered}"
        pos += n
    assert pos == off + 131072, f"chunks do not cover the request: {covered}"

    if not h.can_df():
        raise Skip("server does not advertise NBD_FLAG_SEND_DF (rest of this check)")
    chunks.clear()
    buf = h.pread_structured(131072, off, cb, nbd.CMD_FLAG_DF)
    content = [c for c in chunks if c[2] in (nbd.READ_DATA, nbd.READ_HOLE)]
    assert len(content) == 1, f"DF read answered with {len(content)} content chunks"
    assert content[0][0] == off and content[0][1] == 131072, f"DF chunk {content[0][:3]} does not cover the request"
    assert buf == data + bytes(65536), "DF read data mismatch"
    h.shutdown()


@check
def errors_out_of_range():
    h = connect(args.uri, strict=False)
    expect_error("read past the end", lambda: h.pread(4096, SIZE), {EINVAL})
    alive(h, "read past the end")
    expect_error("read straddling the end", lambda: h.pread(8192, SIZE - 4096), {EINVAL})
    alive(h, "read straddling the end")
    expect_error("read with offset+length overflowing 64 bits", lambda: h.pread(4096, (1 << 64) - 2048), {EINVAL})
    alive(h, "overflowing read")
    # The spec says SHOULD ENOSPC for writes past the end; qemu-nbd answers EINVAL,
    # blkrep must follow the spec.
    w_err = {ENOSPC} if args.blkrep else {ENOSPC, EINVAL}
    expect_error("write past the end", lambda: h.pwrite(b"x" * 4096, SIZE), w_err)
    alive(h, "write past the end")
    expect_error("write straddling the end", lambda: h.pwrite(b"x" * 8192, SIZE - 4096), w_err)
    alive(h, "write straddling the end")
    assert h.pread(4096, SIZE - 4096) == h.pread(4096, SIZE - 4096)
    expect_error("write zeroes past the end", lambda: h.zero(4096, SIZE), {ENOSPC, EINVAL})
    alive(h, "write zeroes past the end")
    expect_error("trim past the end", lambda: h.trim(4096, SIZE), {EINVAL, ENOSPC})
    alive(h, "trim past the end")
    expect_error("block status past the end", lambda: extents(h, 4096, SIZE), {EINVAL})
    alive(h, "block status past the end")
    if h.can_cache():
        expect_error("cache past the end", lambda: h.cache(4096, SIZE), {EINVAL})
        alive(h, "cache past the end")
    h.shutdown()


@check
def errors_unknown_and_misplaced_flags():
    h = connect(args.uri, strict=False)
    unknown = 1 << 7
    expect_error("read with an unknown flag", lambda: h.pread(4096, 0, unknown), {EINVAL})
    alive(h, "read with an unknown flag")
    expect_error("write with an unknown flag", lambda: h.pwrite(b"u" * 4096, 8 << 20, unknown), {EINVAL})
    alive(h, "write with an unknown flag")
    expect_error("write with REQ_ONE (not a write flag)",
                 lambda: h.pwrite(b"u" * 4096, 8 << 20, nbd.CMD_FLAG_REQ_ONE), {EINVAL})
    alive(h, "write with REQ_ONE")
    expect_error("trim with NO_HOLE (not a trim flag)",
                 lambda: h.trim(4096, 8 << 20, nbd.CMD_FLAG_NO_HOLE), {EINVAL})
    alive(h, "trim with NO_HOLE")
    expect_error("flush with an unknown flag", lambda: h.flush(unknown), {EINVAL})
    alive(h, "flush with an unknown flag")
    if not h.can_df():
        expect_error("read with DF although DF was not advertised",
                     lambda: h.pread(4096, 0, nbd.CMD_FLAG_DF), {EINVAL})
        alive(h, "read with DF not advertised")
    h.shutdown()


def unaligned_and_oversized(uri, label):
    h = connect(uri, strict=False)
    size = h.get_size()
    minimum = h.get_block_size(nbd.SIZE_MINIMUM) or 1
    maximum = h.get_block_size(nbd.SIZE_MAXIMUM)
    base = 9 << 20
    if minimum == 1:
        h.pwrite(b"\x11" * 8192, base)
        h.pwrite(b"\x22" * 3, base + 1001)
        got = h.pread(8192, base)
        assert got == b"\x11" * 1001 + b"\x22" * 3 + b"\x11" * (8192 - 1004), f"{label}: unaligned write wrong"
        assert h.pread(7, base + 999) == b"\x11\x11\x22\x22\x22\x11\x11", f"{label}: unaligned read wrong"
    else:
        expect_error(f"{label}: read not aligned to the minimum block size {minimum}",
                     lambda: h.pread(minimum, base + 1), {EINVAL})
        alive(h, "unaligned read")
        expect_error(f"{label}: write not aligned to the minimum block size {minimum}",
                     lambda: h.pwrite(b"a" * minimum, base + 1), {EINVAL})
        alive(h, "unaligned write")
        h.pwrite(b"\x33" * minimum, base)
        assert h.pread(minimum, base) == b"\x33" * minimum
    if maximum and maximum + 4096 <= min(size, 64 << 20):
        n = maximum + 4096
        expect_error(f"{label}: read of {n} bytes (> maximum {maximum})", lambda: h.pread(n, 0), {EINVAL, EOVERFLOW})
        alive(h, "oversized read")
        # An oversized write carries its payload: blkrep must drain it and keep the
        # connection; other servers (qemu-nbd) may hang up instead.
        h2 = connect(uri, strict=False)
        try:
            h2.pwrite(bytes(n), 0)
        except nbd.Error as e:
            if e.errnum not in (EINVAL, EOVERFLOW):
                if args.blkrep or not (h2.aio_is_dead() or h2.aio_is_closed()):
                    raise AssertionError(f"{label}: write of {n} bytes (> maximum {maximum}) failed with "
                                         f"{e.errno or e.errnum} ({e.string}); expected EINVAL or EOVERFLOW "
                                         f"on a connection that stays usable")
                print(f"     info: {label}: server hung up on an oversized write")
            else:
                alive(h2, "oversized write")
        else:
            raise AssertionError(f"{label}: write of {n} bytes (> maximum {maximum}) succeeded")
        h2.close() if hasattr(h2, "close") else None
    else:
        print(f"     info: {label}: maximum block size {maximum}: no in-range oversized request possible")
    h.shutdown()


@check
def errors_unaligned_and_oversized():
    unaligned_and_oversized(args.uri, "export")


@check
def direct_export():
    if not args.direct_uri:
        raise Skip("no --direct-uri")
    h = connect(args.direct_uri)
    data = rand_bytes(65536)
    h.pwrite(data, 1 << 20)
    h.flush()
    assert h.pread(65536, 1 << 20) == data
    h.shutdown()
    unaligned_and_oversized(args.direct_uri, "O_DIRECT export")


def wait_all(h, cookies, what, timeout=60):
    """Polls until every command completed (aio_command_completed raises on a failed
    command and retires a completed one, so each cookie is asked until it is done)."""
    pending = set(cookies)
    deadline = time.monotonic() + timeout
    while pending:
        for c in list(pending):
            if h.aio_command_completed(c):
                pending.discard(c)
        if not pending:
            break
        assert h.aio_in_flight() > 0, f"{what}: {len(pending)} commands neither completed nor in flight"
        assert time.monotonic() < deadline, f"{what}: {len(pending)} commands still pending after {timeout}s"
        h.poll(1000)

@check
def pipelined_requests():
    h = connect(args.uri)
    n = 64
    bufs = []
    cookies = []
    base = 10 << 20
    for i in range(n):
        data = rand_bytes(32768)
        bufs.append(data)
        cookies.append(h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), base + i * 32768,
                                    flags=nbd.CMD_FLAG_FUA if i % 7 == 0 else 0))
    wait_all(h, cookies, "pipelined writes")
    rbufs = [nbd.Buffer(32768) for _ in range(n)]
    cookies = [h.aio_pread(rbufs[i], base + i * 32768) for i in range(n)]
    wait_all(h, cookies, "pipelined reads")
    for i in range(n):
        assert rbufs[i].to_bytearray() == bufs[i], f"pipelined read {i} mismatch"
    # mixed: writes, a flush, reads and a block status in flight together
    rb = nbd.Buffer(32768)
    wb = rand_bytes(32768)
    cs = [h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(wb)), base + n * 32768),
          h.aio_flush(),
          h.aio_pread(rb, base),
          h.aio_block_status(1 << 20, base, lambda *a: 0)]
    wait_all(h, cs, "mixed commands")
    assert rb.to_bytearray() == bufs[0], "read in a mixed batch mismatch"
    assert h.pread(32768, base + n * 32768) == wb
    h.shutdown()



@check
def multi_conn_visibility():
    h1 = connect(args.uri)
    h2 = connect(args.uri)
    if args.blkrep:
        assert h1.can_multi_conn() and h2.can_multi_conn(), "multi-conn not advertised"
    off = 11 << 20
    d1 = rand_bytes(65536)
    h1.pwrite(d1, off)
    h1.flush()
    assert h2.pread(65536, off) == d1, "second connection does not see the first's flushed write"
    d2 = rand_bytes(65536)
    h2.pwrite(d2, off, nbd.CMD_FLAG_FUA)
    assert h1.pread(65536, off) == d2, "first connection does not see the second's FUA write"
    h1.shutdown()
    h2.shutdown()


def concurrent_flushes(uri, base, label):
    """Four connections keep writes, FLUSHes and FUA writes in flight together, so
    flushes from several connections overlap (the server joins them into shared
    syncs): every command must complete, and every write read back."""
    conns = [connect(uri) for _ in range(4)]
    region, block, rounds = 512 * 1024, 4096, 8
    expected = {}
    for r in range(rounds):
        cookies = [[] for _ in conns]
        for i in range(16):
            for c, h in enumerate(conns):
                off = base + c * region + (r * 16 + i) * block
                data = rand_bytes(block)
                expected[off] = data
                flags = nbd.CMD_FLAG_FUA if i % 5 == 4 else 0
                cookies[c].append(h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), off,
                                               flags=flags))
                if i % 2 == 1:
                    cookies[c].append(h.aio_flush())
        for c, h in enumerate(conns):
            wait_all(h, cookies[c], f"{label}: connection {c}, round {r}")
    for h in conns:
        h.shutdown()
    h = connect(uri)
    for off, data in expected.items():
        assert h.pread(block, off) == data, f"{label}: write at {off} not read back"
    h.shutdown()


@check
def concurrent_flushes_on_four_connections():
    # 12..14 MiB: below the upper half the block-status checks need untouched.
    if SIZE // 2 < 14 << 20:
        raise Skip("--uri export smaller than 28 MiB")
    concurrent_flushes(args.uri, 12 << 20, "buffered export")
    if args.direct_uri:
        concurrent_flushes(args.direct_uri, 4 << 20, "O_DIRECT export")


@check
def read_only_export():
    if not args.ro_uri:
        raise Skip("no --ro-uri")
    h = connect(args.ro_uri, strict=False)
    assert h.is_read_only(), "read-only export not flagged NBD_FLAG_READ_ONLY"
    size = h.get_size()
    before = h.pread(min(size, 65536), 0)
    # The spec says SHOULD EPERM; qemu-nbd answers EINVAL, blkrep must say EPERM.
    ro_err = {EPERM} if args.blkrep else {EPERM, EINVAL}
    expect_error("write to a read-only export", lambda: h.pwrite(b"w" * 4096, 0), ro_err)
    alive(h, "write to a read-only export")
    expect_error("write zeroes to a read-only export", lambda: h.zero(4096, 0), ro_err)
    alive(h, "write zeroes to a read-only export")
    expect_error("trim on a read-only export", lambda: h.trim(4096, 0), ro_err)
    alive(h, "trim on a read-only export")
    assert h.pread(min(size, 65536), 0) == before, "read-only export changed"
    h.flush() if h.can_flush() else None
    h.shutdown()


def dirty_map(h, ctx):
    return map_context(h, ctx, RESERVED, SIZE)


@check
def blkrep_dirty_context():
    if not args.blkrep:
        raise Skip("blkrep-specific")
    h = connect(args.uri, contexts=(BASE, DIRTY))
    assert h.can_meta_context(DIRTY)
    m = dirty_map(h, DIRTY)
    dirty = [e for e in m if e[2] & 1]
    assert not dirty, f"never-written range reported dirty before any write: {dirty[:8]}"
    w_off = RESERVED + (1 << 20)
    z_off = RESERVED + (3 << 20)
    t_off = RESERVED + (5 << 20)
    u_off = RESERVED + (7 << 20) + 100  # unaligned, inside one 4k block
    h.pwrite(rand_bytes(65536), w_off)
    h.zero(8192, z_off)
    h.trim(4096, t_off)
    h.pwrite(b"q" * 10, u_off)
    expected = [(w_off, 65536), (z_off, 8192), (t_off, 4096), (u_off - 100, 4096)]

    def is_expected(off):
        return any(o <= off < o + n for o, n in expected)

    m = dirty_map(h, DIRTY)
    for o, ln, fl in m:
        if o + ln < SIZE:
            assert o % BLOCK == 0 and ln % BLOCK == 0, f"dirty extent {o}+{ln} not on 4 KiB boundaries"
    for off in range(RESERVED, SIZE, BLOCK):
        fl = flags_at(m, off)
        if is_expected(off):
            assert fl & 1, f"block at {off} written in the open cycle but not dirty; map {m[:12]}"
        else:
            assert not (fl & 1), f"block at {off} never written but dirty; map {m[:12]}"
    # REQ_ONE on the dirty context
    got = extents(h, 1 << 20, w_off, nbd.CMD_FLAG_REQ_ONE)
    for ctx in (BASE, DIRTY):
        check_extent_shape(ctx, got[ctx], w_off, 1 << 20, SIZE, req_one=True)
    assert got[DIRTY][0][1] & 1, f"REQ_ONE at a dirty offset not dirty: {got[DIRTY]}"
    assert got[DIRTY][0][0] <= 65536, f"REQ_ONE dirty extent longer than the dirty range: {got[DIRTY]}"
    h.shutdown()

    # The alias names the same map.
    h = connect(args.uri, contexts=(DIRTY_ALIAS,))
    assert h.can_meta_context(DIRTY_ALIAS), f"{DIRTY_ALIAS} not negotiated"
    m2 = dirty_map(h, DIRTY_ALIAS)
    for off in range(RESERVED, SIZE, BLOCK):
        assert bool(flags_at(m2, off) & 1) == is_expected(off), f"{DIRTY_ALIAS} disagrees with {DIRTY} at {off}"
    h.shutdown()


total_failed = len(RESULTS["fail"])
print(f"{len(RESULTS['pass'])} passed, {total_failed} failed, {len(RESULTS['skip'])} skipped")
if total_failed:
    print("failed: " + ", ".join(RESULTS["fail"]))
sys.exit(1 if total_failed or not RESULTS["pass"] else 0)
