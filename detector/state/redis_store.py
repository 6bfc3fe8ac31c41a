"""The state store in Redis, shared by every function instance (e.g. Memorystore).

One Lua script per call makes each observe and each label atomic, so concurrent instances
never count a transaction twice or read half an update. Semantics are those of
`detector.state.base` (the same test suite runs against both stores).

Keys (``P`` is the key prefix, default ``fraud:``), all expiring ``retention`` seconds after
their last write:

- ``P t:<transaction_id>``: hash ``ts``, ``label`` ("" / "1" / "0") and ``ents`` (the
  entities it was recorded under). Its existence makes a redelivery a duplicate.
- ``P h:<kind>:<id>``: sorted set of the entity's transactions, score = timestamp, member =
  ``transaction_id NUL micros NUL amount NUL terminal NUL merchant NUL country`` (attributes
  are "" when absent, else "+value"). Equal scores sort by member bytes, i.e. by
  transaction_id: the same order as the memory store. Trimmed to ``watermark - retention``.
- ``P f:<kind>:<id>``: sorted set of the entity's transactions labelled fraudulent.
- ``P wm``: the watermark, the newest timestamp recorded.

The label script derives the entity keys from the transaction's hash, so the store needs a
single Redis node (Memorystore standard tier), not Redis Cluster.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.connection
import redis.exceptions

from detector.errors import StateConfigError, StoreUnavailable, TransientError
from detector.state import base
from detector.state.base import Event, Features, LabelOutcome, StateConfig

__all__ = ["RedisStore", "redact"]

log = logging.getLogger(__name__)

_LIB = r"""
local function fmt(x) return string.format('%.17g', x) end

-- Byte order, like Python's str order on UTF-8; Lua's `<` on strings follows the locale.
local function bytes_lt(a, b)
  local n = math.min(#a, #b)
  for i = 1, n do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end

local ROW = '^(.-)%z(.-)%z(.-)%z(.-)%z(.-)%z(.*)$'

local function split(m)
  local parts = {}
  local start = 1
  for i = 1, 5 do
    local j = string.find(m, '\0', start, true)
    parts[i] = string.sub(m, start, j - 1)
    start = j + 1
  end
  parts[6] = string.sub(m, start)
  return parts
end
"""

_OBSERVE = (
    _LIB
    + r"""
local ts = tonumber(ARGV[1])
local txid = ARGV[2]
local member = ARGV[3]
local lateness = tonumber(ARGV[4])
local keep = tonumber(ARGV[5])
local lookback = tonumber(ARGV[6])
local ttl = tonumber(ARGV[7])
local ents = ARGV[8]
local nwin = tonumber(ARGV[9])
local windows = {}
for w = 1, nwin do windows[w] = tonumber(ARGV[9 + w]) end
local nent = (#KEYS - 2) / 2

local status = 'new'
local wm = redis.call('GET', KEYS[2])
if wm then wm = tonumber(wm) else wm = nil end
if redis.call('EXISTS', KEYS[1]) == 1 then
  status = 'dup'
elseif wm and ts < wm - lateness then
  status = 'late'
end

local out = {status}
local oldest = ts - windows[nwin]
for e = 1, nent do
  local hkey, fkey = KEYS[1 + 2 * e], KEYS[2 + 2 * e]
  local rows = redis.call('ZRANGEBYSCORE', hkey, '(' .. fmt(oldest), fmt(ts), 'WITHSCORES')
  local frauds = {}
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', fkey, '(' .. fmt(oldest), fmt(ts))) do
    frauds[id] = true
  end
  -- Each prior row falls in one band (the smallest window holding it); windows are sums of
  -- bands. A value is in window w when its newest occurrence is.
  local cut, bc, bt, bh, bf = {}, {}, {}, {}, {}
  for w = 1, nwin do
    cut[w] = ts - windows[w]
    bc[w] = 0; bt[w] = 0; bh[w] = 0; bf[w] = 0
  end
  local newest = {{}, {}, {}}
  local last = nil
  for i = 1, #rows, 2 do
    local id, micro, amount, a1, a2, a3 = string.match(rows[i], ROW)
    local s = tonumber(rows[i + 1])
    if id ~= txid and (s < ts or bytes_lt(id, txid)) then
      last = s
      local w = 1
      while s <= cut[w] do w = w + 1 end
      bc[w] = bc[w] + 1
      bt[w] = bt[w] + tonumber(micro)
      amount = tonumber(amount)
      if amount > bh[w] then bh[w] = amount end
      if frauds[id] then bf[w] = bf[w] + 1 end
      if a1 ~= '' then newest[1][a1] = s end
      if a2 ~= '' then newest[2][a2] = s end
      if a3 ~= '' then newest[3][a3] = s end
    end
  end
  local nd = {}
  for w = 1, nwin do nd[w] = {0, 0, 0} end
  for a = 1, 3 do
    for _, s in pairs(newest[a]) do
      for w = 1, nwin do
        if s > cut[w] then nd[w][a] = nd[w][a] + 1 end
      end
    end
  end
  local cnt, tot, hi, fc = {}, {}, {}, {}
  local c, t, h, f = 0, 0, 0, 0
  for w = 1, nwin do
    c = c + bc[w]; t = t + bt[w]; f = f + bf[w]
    if bh[w] > h then h = bh[w] end
    cnt[w] = c; tot[w] = t; hi[w] = h; fc[w] = f
  end
  if last == nil and lookback > windows[nwin] then
    local older = redis.call('ZREVRANGEBYSCORE', hkey, fmt(oldest), '(' .. fmt(ts - lookback),
      'WITHSCORES', 'LIMIT', 0, 2)
    for i = 1, #older, 2 do
      if last == nil and split(older[i])[1] ~= txid then last = tonumber(older[i + 1]) end
    end
  end
  for w = 1, nwin do
    out[#out + 1] = string.format('%d', cnt[w])
    out[#out + 1] = string.format('%d', tot[w])
    out[#out + 1] = fmt(hi[w])
    out[#out + 1] = string.format('%d', fc[w])
    out[#out + 1] = string.format('%d', nd[w][1])
    out[#out + 1] = string.format('%d', nd[w][2])
    out[#out + 1] = string.format('%d', nd[w][3])
  end
  if last ~= nil and last > ts - lookback then
    out[#out + 1] = fmt(ts - last)
  else
    out[#out + 1] = ''
  end
end

if status == 'new' then
  redis.call('HSET', KEYS[1], 'ts', ARGV[1], 'label', '', 'ents', ents)
  redis.call('EXPIRE', KEYS[1], ttl)
  if wm == nil or ts > wm then
    wm = ts
    redis.call('SET', KEYS[2], ARGV[1], 'EX', ttl)
  else
    redis.call('EXPIRE', KEYS[2], ttl)
  end
  local cutoff = fmt(wm - keep)
  for e = 1, nent do
    local hkey, fkey = KEYS[1 + 2 * e], KEYS[2 + 2 * e]
    redis.call('ZADD', hkey, ARGV[1], member)
    redis.call('ZREMRANGEBYSCORE', hkey, '-inf', cutoff)
    redis.call('EXPIRE', hkey, ttl)
    redis.call('ZREMRANGEBYSCORE', fkey, '-inf', cutoff)
    redis.call('EXPIRE', fkey, ttl)
  end
end
-- One bulk string: parsing one reply item is much cheaper for the client than ninety.
return table.concat(out, ' ')
"""
)

_LABEL = r"""
local data = redis.call('HMGET', KEYS[1], 'ts', 'label', 'ents')
if not data[1] then return 'unknown' end
local new, old = ARGV[1], data[2]
if old == new then return 'duplicate' end
local outcome = 'changed'
if old == '' then outcome = 'applied' end
redis.call('HSET', KEYS[1], 'label', new)
local prefix, txid, ttl = ARGV[2], ARGV[3], tonumber(ARGV[4])
local ents = data[3]
local start = 1
while start <= #ents do
  local j = string.find(ents, '\0', start, true) or (#ents + 1)
  local fkey = prefix .. 'f:' .. string.sub(ents, start, j - 1)
  if new == '1' then
    redis.call('ZADD', fkey, data[1], txid)
    redis.call('EXPIRE', fkey, ttl)
  else
    redis.call('ZREM', fkey, txid)
  end
  start = j + 1
end
return outcome
"""


def redact(url: str) -> str:
    """The URL without its password, fit for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + host))


def _attr(value: str | None) -> str:
    return "" if value is None else "+" + value


class RedisStore:
    """State in Redis: many function instances share it.

    The client connects on first use (safe to build before a fork); each call is one
    round trip running a Lua script.
    """

    def __init__(
        self,
        config: StateConfig,
        url: str,
        *,
        prefix: str = "fraud:",
        connect_timeout: float = 2.0,
        timeout: float = 5.0,
    ) -> None:
        self.config = config
        self.url = url
        self.prefix = prefix
        self._connect_timeout = connect_timeout
        self._timeout = timeout
        try:  # the URL's syntax, now: a bad REDIS_URL must stop start-up, not every message
            redis.connection.parse_url(url)  # type: ignore[no-untyped-call]
        except ValueError as error:
            raise StateConfigError(
                f"REDIS_URL: {error}: {redact(url)}", setting="REDIS_URL"
            ) from None
        self._client: redis.Redis | None = None
        self._observe: Any = None
        self._label: Any = None
        windows = config.windows
        self._window_args = [str(len(windows)), *(str(w) for w in windows)]
        self._fixed = [
            repr(float(config.allowed_lateness)),
            repr(float(config.keep)),
            repr(float(config.keep - config.allowed_lateness)),
            str(math.ceil(config.keep)),
        ]
        self._ttl = str(math.ceil(config.keep))
        self._builder = base.FeatureBuilder(windows)
        self._nwin = len(windows)

    def check(self) -> None:
        """Reach the server once (PING), as a function does at start-up.

        Raises:
            StoreUnavailable: the server cannot be reached or refused the connection.
        """
        try:
            self._connect().ping()
        except redis.exceptions.RedisError as error:
            raise StoreUnavailable(
                f"REDIS_URL: cannot reach {redact(self.url)}: {error}", resource=redact(self.url)
            ) from error

    def _connect(self) -> redis.Redis:
        if self._client is None:
            client = redis.Redis.from_url(
                self.url,
                socket_connect_timeout=self._connect_timeout,
                socket_timeout=self._timeout,
            )
            self._observe = client.register_script(_OBSERVE)
            self._label = client.register_script(_LABEL)
            self._client = client
        return self._client

    def _run(self, script_name: str, keys: list[str], args: list[str]) -> Any:
        self._connect()
        script = self._observe if script_name == "observe" else self._label
        return self._guard(script_name, lambda: script(keys=keys, args=args))

    def _guard(self, what: str, call: Callable[[], Any]) -> Any:
        """Run one round trip; Redis errors become the store's transient errors."""
        try:
            return call()
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as error:
            log.error("redis at %s unreachable during %s: %s", redact(self.url), what, error)
            raise StoreUnavailable(
                f"redis at {redact(self.url)} unreachable: {error}", resource=redact(self.url)
            ) from error
        except redis.exceptions.RedisError as error:
            log.error("redis at %s: %s failed: %s", redact(self.url), what, error)
            raise TransientError(
                f"redis at {redact(self.url)}: {what} failed: {error}",
                resource=redact(self.url),
            ) from error

    def observe(self, event: Event, needed: frozenset[str] | None = None) -> Features:
        """See `detector.state.base.StateStore.observe`."""
        keys, args, pairs = self._observe_call(event)
        return self._features(self._run("observe", keys, args), event, pairs, needed)

    def observe_many(
        self, events: Sequence[Event], needed: frozenset[str] | None = None
    ) -> list[Features]:
        """See `detector.state.base.StateStore.observe_many`: one pipelined round trip.

        The scripts run in order, each atomic; a failure of the connection records nothing
        that the redelivered batch would count twice (each transaction counts once).
        """
        if not events:
            return []
        self._connect()
        assert self._client is not None
        calls = [self._observe_call(event) for event in events]
        pipe = self._client.pipeline(transaction=False)
        for keys, args, _ in calls:
            self._observe(keys=keys, args=args, client=pipe)
        replies = self._guard("observe", pipe.execute)
        return [
            self._features(reply, event, pairs, needed)
            for reply, event, (_, _, pairs) in zip(replies, events, calls, strict=True)
        ]

    def _observe_call(self, event: Event) -> tuple[list[str], list[str], list[tuple[str, str]]]:
        """Keys and arguments of the observe script for one event, and its entities."""
        txid = event.transaction_id
        pairs = base.entities_of(event)
        prefix = self.prefix
        keys = [f"{prefix}t:{txid}", f"{prefix}wm"]
        for kind, ident in pairs:
            keys.append(f"{prefix}h:{kind}:{ident}")
            keys.append(f"{prefix}f:{kind}:{ident}")
        stamp = repr(float(event.timestamp))
        member = "\0".join(
            (
                txid,
                str(base.micros(event.amount)),
                repr(float(event.amount)),
                _attr(event.terminal),
                _attr(event.merchant),
                _attr(event.country),
            )
        )
        ents = "\0".join(f"{kind}:{ident}" for kind, ident in pairs)
        return keys, [stamp, txid, member, *self._fixed, ents, *self._window_args], pairs

    def _features(
        self,
        reply: bytes,
        event: Event,
        pairs: list[tuple[str, str]],
        needed: frozenset[str] | None,
    ) -> Features:
        """The observe script's reply as each entity's features."""
        txid = event.transaction_id
        fields = reply.split(b" ")
        status = fields[0].decode()
        if status == "dup":
            log.info("transaction %s already recorded: scored, not counted again", txid)
        elif status == "late":
            log.warning(
                "transaction %s is more than %.0f s behind the newest: scored, not recorded",
                txid,
                self.config.allowed_lateness,
            )
        features: Features = {}
        at = 1
        nwin = self._nwin
        for kind, _ in pairs:
            raws: list[base.Raw] = []
            for _w in range(nwin):
                c, s, h, f, t, m, n = fields[at : at + 7]
                raws.append((int(c), int(s), float(h), int(f), int(t), int(m), int(n)))
                at += 7
            gap = float(fields[at]) if fields[at] else None
            at += 1
            features[kind] = base.select(self._builder.build(kind, event.amount, raws, gap), needed)
        return features

    def record_label(self, transaction_id: str, is_fraud: bool) -> LabelOutcome:
        """See `detector.state.StateStore.record_label`."""
        reply = self._run(
            "label",
            [f"{self.prefix}t:{transaction_id}"],
            ["1" if is_fraud else "0", self.prefix, transaction_id, self._ttl],
        )
        outcome = LabelOutcome(reply.decode())
        log.info("label %s for %s: %s", is_fraud, transaction_id, outcome)
        return outcome

    def drop(self) -> None:
        """Delete every key under this store's prefix (a replay's own state, when done)."""
        client = self._connect()

        def unlink_all() -> None:
            batch: list[bytes] = []
            for key in client.scan_iter(match=f"{self.prefix}*", count=1000):
                batch.append(key)
                if len(batch) == 1000:
                    client.unlink(*batch)
                    batch.clear()
            if batch:
                client.unlink(*batch)

        self._guard("drop", unlink_all)

    def declare_reads(self, reads: Mapping[str, frozenset[str] | None]) -> None:
        """Nothing to prepare: the script computes what each call's `needed` asks."""

    def close(self) -> None:
        """Close the connection pool."""
        if self._client is not None:
            self._client.close()
            self._client = None
