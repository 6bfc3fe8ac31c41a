"""The state store in Redis or Valkey, single node or cluster, shared by every instance.

Each entity's state lives under keys of one hash slot, and every script touches one entity:
it runs atomically on the node that holds the entity, so concurrent instances never count a
transaction twice for an entity nor read half an update, and Redis Cluster (Memorystore
Cluster) accepts it. An observe is one pipeline, one round trip per node: a script per
entity the transaction names and the write of its label index. Semantics are those of
`detector.state.base` (the same test suite runs against every store).

Keys (``P`` is the key prefix, default ``fraud:``; ``E`` is ``<kind>:<id>``, e.g.
``customer:c1``, the hash tag that puts an entity's keys in one slot), all expiring
``retention`` seconds after their last write:

- ``P{E}:h``: sorted set of the entity's transactions, score = timestamp, member =
  ``transaction_id NUL micros NUL amount NUL terminal NUL merchant NUL country`` (attributes
  are "" when absent, else "+value"). Equal scores sort by member bytes, i.e. by
  transaction_id: the same order as the memory store. Its highest score is the entity's
  newest, which decides lateness; each write trims it to ``newest - retention``.
- ``P{E}:i``: hash transaction_id -> ``"<timestamp> <label>"`` (label "", "1" or "0") of the
  transactions the entity holds, trimmed with the history: a redelivery finds its id here
  (about 60 bytes per transaction and entity, for the retention).
- ``P{E}:f``: sorted set of the entity's transactions labelled fraudulent.
- ``P{t:<transaction_id>}``: ``"<timestamp> NUL E NUL E ..."``, the entities a transaction
  names, so that a label by transaction_id finds them (about 150 bytes per transaction, kept
  for the retention in wall-clock time: labels later than that are ``unknown``).

A label is two round trips: read the index, then a script per entity that records the label
for that entity once (its outcome is the same for every entity that holds the transaction).

`REDIS_URL` may name any node of a cluster: the store asks the node (``INFO cluster``) and
speaks the cluster protocol when cluster mode is enabled.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.cluster
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
-- One entity: KEYS = history, fraud set, id hash.
local ts = tonumber(ARGV[1])
local txid = ARGV[2]
local member = ARGV[3]
local lateness = tonumber(ARGV[4])
local keep = tonumber(ARGV[5])
local lookback = tonumber(ARGV[6])
local ttl = tonumber(ARGV[7])
local nwin = tonumber(ARGV[8])
local windows = {}
for w = 1, nwin do windows[w] = tonumber(ARGV[8 + w]) end
local hkey, fkey, ikey = KEYS[1], KEYS[2], KEYS[3]

local status = 'new'
local top = redis.call('ZRANGE', hkey, -1, -1, 'WITHSCORES')
local newest = nil
if top[2] then newest = tonumber(top[2]) end
if redis.call('HEXISTS', ikey, txid) == 1 then
  status = 'dup'
elseif newest and ts < newest - lateness then
  status = 'late'
end

local out = {status}
local oldest = ts - windows[nwin]
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
local seen = {{}, {}, {}}
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
    if a1 ~= '' then seen[1][a1] = s end
    if a2 ~= '' then seen[2][a2] = s end
    if a3 ~= '' then seen[3][a3] = s end
  end
end
local nd = {}
for w = 1, nwin do nd[w] = {0, 0, 0} end
for a = 1, 3 do
  for _, s in pairs(seen[a]) do
    for w = 1, nwin do
      if s > cut[w] then nd[w][a] = nd[w][a] + 1 end
    end
  end
end
local c, t, h, f = 0, 0, 0, 0
for w = 1, nwin do
  c = c + bc[w]; t = t + bt[w]; f = f + bf[w]
  if bh[w] > h then h = bh[w] end
  out[#out + 1] = string.format('%d', c)
  out[#out + 1] = string.format('%d', t)
  out[#out + 1] = fmt(h)
  out[#out + 1] = string.format('%d', f)
  out[#out + 1] = string.format('%d', nd[w][1])
  out[#out + 1] = string.format('%d', nd[w][2])
  out[#out + 1] = string.format('%d', nd[w][3])
end
if last == nil and lookback > windows[nwin] then
  local older = redis.call('ZREVRANGEBYSCORE', hkey, fmt(oldest), '(' .. fmt(ts - lookback),
    'WITHSCORES', 'LIMIT', 0, 2)
  for i = 1, #older, 2 do
    if last == nil and split(older[i])[1] ~= txid then last = tonumber(older[i + 1]) end
  end
end
if last ~= nil and last > ts - lookback then
  out[#out + 1] = fmt(ts - last)
else
  out[#out + 1] = ''
end

if status == 'new' then
  redis.call('ZADD', hkey, ARGV[1], member)
  redis.call('HSET', ikey, txid, ARGV[1] .. ' ')
  if newest == nil or ts > newest then newest = ts end
  local cutoff = fmt(newest - keep)
  local gone = redis.call('ZRANGEBYSCORE', hkey, '-inf', cutoff)
  if #gone > 0 then
    local ids = {}
    for k, m in ipairs(gone) do
      ids[#ids + 1] = string.sub(m, 1, string.find(m, '\0', 1, true) - 1)
      if #ids == 500 or k == #gone then
        redis.call('HDEL', ikey, unpack(ids))
        ids = {}
      end
    end
    redis.call('ZREMRANGEBYSCORE', hkey, '-inf', cutoff)
    redis.call('ZREMRANGEBYSCORE', fkey, '-inf', cutoff)
  end
  redis.call('EXPIRE', hkey, ttl)
  redis.call('EXPIRE', ikey, ttl)
  redis.call('EXPIRE', fkey, ttl)
end
-- One bulk string: parsing one reply item is much cheaper for the client than thirty.
return table.concat(out, ' ')
"""
)

_LABEL = r"""
-- One entity: KEYS = fraud set, id hash. Records the label once for this entity.
local held = redis.call('HGET', KEYS[2], ARGV[2])
if not held then return 'unknown' end
local space = string.find(held, ' ', 1, true)
local ts, old = string.sub(held, 1, space - 1), string.sub(held, space + 1)
local new, txid = ARGV[1], ARGV[2]
-- Applied even to a duplicate: a label cut short between entities completes on redelivery.
if new == '1' then
  redis.call('ZADD', KEYS[1], ts, txid)
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
else
  redis.call('ZREM', KEYS[1], txid)
end
if old == new then return 'duplicate' end
redis.call('HSET', KEYS[2], txid, ts .. ' ' .. new)
if old == '' then return 'applied' end
return 'changed'
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


_Call = tuple[list[list[str]], list[tuple[str, str]], list[str]]


def _lost_scripts(error: redis.exceptions.ResponseError) -> bool:
    """Whether an error says the server lacks a script or function the store loaded."""
    # A pipeline's error names its command before the server's words.
    return isinstance(error, redis.exceptions.NoScriptError) or "Function not found" in str(error)


#: Commands per write of a streamed pipeline (`_Stream`).
_CHUNK = 256


class _Stream:
    """A pipeline on one connection that sends its commands in chunks as they are queued
    and reads the replies of each chunk after sending the next: the server runs a chunk
    while the client builds and packs the next one, and parses the one before. The same
    commands in the same order as one pipeline; one round trip's wait instead of one per
    chunk. Queues what `_pipeline`'s callers queue (``set``, ``evalsha``)."""

    def __init__(self, connection: Any) -> None:
        self._connection = connection
        self._queued: list[tuple[Any, ...]] = []
        self._sent: deque[int] = deque()
        self.replies: list[Any] = []

    def set(self, name: str, value: str, ex: int) -> None:
        self._queue(("SET", name, value, "EX", ex))

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: str) -> None:
        self._queue(("EVALSHA", sha, numkeys, *keys_and_args))

    def fcall(self, function: str, numkeys: int, *keys_and_args: str) -> None:
        self._queue(("FCALL", function, numkeys, *keys_and_args))

    def _queue(self, command: tuple[Any, ...]) -> None:
        self._queued.append(command)
        if len(self._queued) >= _CHUNK:
            self._send()

    def _send(self) -> None:
        connection = self._connection
        connection.send_packed_command(connection.pack_commands(self._queued))
        self._sent.append(len(self._queued))
        self._queued = []
        if len(self._sent) > 1:
            self._read(self._sent.popleft())

    def _read(self, count: int) -> None:
        for _ in range(count):
            try:
                self.replies.append(self._connection.read_response())
            except redis.exceptions.ResponseError as error:  # in its place, as a pipeline
                self.replies.append(error)

    def finish(self) -> list[Any]:
        """Send what is left and read every reply; raise the first error reply."""
        if self._queued:
            self._send()
        while self._sent:
            self._read(self._sent.popleft())
        for reply in self.replies:
            if isinstance(reply, redis.exceptions.ResponseError):
                raise reply
        return self.replies


class RedisStore:
    """State in Redis or Valkey, single node or cluster: many function instances share it.

    The client connects on first use (safe to build before a fork) and then knows whether
    the server is a cluster; each observe is one pipeline of per-entity scripts.
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
        if "{" in prefix or "}" in prefix:
            raise StateConfigError(
                f"prefix: must not contain braces (they choose the hash slot), got {prefix!r}",
                setting="prefix",
            )
        self.prefix = prefix
        self._connect_timeout = connect_timeout
        self._timeout = timeout
        try:  # the URL's syntax, now: a bad REDIS_URL must stop start-up, not every message
            redis.connection.parse_url(url)  # type: ignore[no-untyped-call]
        except ValueError as error:
            raise StateConfigError(
                f"REDIS_URL: {error}: {redact(url)}", setting="REDIS_URL"
            ) from None
        self._client: redis.Redis | redis.cluster.RedisCluster | None = None
        # The scripts' sources, registered on connecting (a subclass may set its own).
        self._observe_source = _OBSERVE
        self._label_source = _LABEL
        self._observe: Any = None
        self._label: Any = None
        windows = config.windows
        self._fixed = [
            repr(float(config.allowed_lateness)),
            repr(float(config.keep)),
            repr(float(config.keep - config.allowed_lateness)),
            str(math.ceil(config.keep)),
            str(len(windows)),
            *(str(w) for w in windows),
        ]
        self._ttl = math.ceil(config.keep)
        self._builder = base.FeatureBuilder(windows)
        self._nwin = len(windows)

    @property
    def cluster(self) -> bool:
        """Whether the server is a cluster (connects to find out)."""
        return isinstance(self._guard("connect", self._connect), redis.cluster.RedisCluster)

    def check(self) -> None:
        """Reach the server once (PING), as a function does at start-up.

        Raises:
            StoreUnavailable: the server cannot be reached or refused the connection.
        """
        try:
            self._connect().ping()
        except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException) as error:
            raise StoreUnavailable(
                f"REDIS_URL: cannot reach {redact(self.url)}: {error}", resource=redact(self.url)
            ) from error

    def _connect(self) -> redis.Redis | redis.cluster.RedisCluster:
        if self._client is None:
            client: redis.Redis | redis.cluster.RedisCluster = redis.Redis.from_url(
                self.url,
                socket_connect_timeout=self._connect_timeout,
                socket_timeout=self._timeout,
            )
            try:
                enabled = client.info("cluster").get("cluster_enabled") == 1
            except redis.exceptions.ResponseError:  # a server without the section
                enabled = False
            if enabled:
                client.close()
                client = redis.cluster.RedisCluster.from_url(
                    self.url,
                    socket_connect_timeout=self._connect_timeout,
                    socket_timeout=self._timeout,
                )
            self._observe = client.register_script(self._observe_source)
            self._label = client.register_script(self._label_source)
            # Loaded here, and again after a NOSCRIPT (`_pipeline`): pipelines send only
            # EVALSHA, without a SCRIPT EXISTS round trip before each.
            self._load_scripts(client)
            self._client = client
        return self._client

    def _load_scripts(self, client: redis.Redis | redis.cluster.RedisCluster) -> None:
        """Load the scripts (on every primary of a cluster)."""
        for script in (self._observe, self._label):
            script.sha = client.script_load(script.script)

    def _pipeline(
        self, what: str, queue: Callable[[Any], None], *, stream: bool = False
    ) -> list[Any]:
        """Queue commands on a pipeline and run it: one round trip per node. `stream` (for
        batches of many transactions): on a single node, send it in chunks as it is queued
        (`_Stream`)."""
        client = self._guard(what, self._connect)

        def execute() -> list[Any]:
            if stream and not isinstance(client, redis.cluster.RedisCluster):
                pool = client.connection_pool
                connection = pool.get_connection()
                try:
                    streamed = _Stream(connection)
                    queue(streamed)
                    return streamed.finish()
                except redis.exceptions.ResponseError:
                    raise  # every reply was read: the connection is in step
                except BaseException:
                    connection.disconnect()  # replies may be left unread on it
                    raise
                finally:
                    pool.release(connection)
            pipe = client.pipeline(transaction=False)
            queue(pipe)
            return list(pipe.execute())

        def run() -> list[Any]:
            try:
                return execute()
            except redis.exceptions.ResponseError as error:
                if not _lost_scripts(error):
                    raise
                # A node restarted or failed over: load again and run again (every script
                # is idempotent per entity, so what did run is not counted twice).
                self._load_scripts(client)
                return execute()

        result: list[Any] = self._guard(what, run)
        return result

    def _guard(self, what: str, call: Callable[[], Any]) -> Any:
        """Run one round trip; Redis errors become the store's transient errors."""
        try:
            return call()
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as error:
            log.error("redis at %s unreachable during %s: %s", redact(self.url), what, error)
            raise StoreUnavailable(
                f"redis at {redact(self.url)} unreachable: {error}", resource=redact(self.url)
            ) from error
        except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException) as error:
            log.error("redis at %s: %s failed: %s", redact(self.url), what, error)
            raise TransientError(
                f"redis at {redact(self.url)}: {what} failed: {error}",
                resource=redact(self.url),
            ) from error

    def _entity(self, kind: str, ident: str) -> str:
        """The common start of an entity's keys: prefix and hash tag."""
        return f"{self.prefix}{{{kind}:{ident}}}:"

    def _index(self, transaction_id: str) -> str:
        return f"{self.prefix}{{t:{transaction_id}}}"

    def observe(self, event: Event, needed: frozenset[str] | None = None) -> Features:
        """See `detector.state.base.StateStore.observe`: one pipeline."""
        return self.observe_many([event], needed)[0]

    def observe_many(
        self, events: Sequence[Event], needed: frozenset[str] | None = None
    ) -> list[Features]:
        """See `detector.state.base.StateStore.observe_many`: one pipeline for the batch.

        The scripts of one entity run in order, each atomic; a failure of the connection
        records nothing that the redelivered batch would count twice (each transaction
        counts once per entity).
        """
        if not events:
            return []
        calls = [self._observe_call(event) for event in events]

        def queue(pipe: Any) -> None:
            for event, (entity_keys, _, args) in zip(events, calls, strict=True):
                pipe.set(self._index(event.transaction_id), args[0] + "\0" + args[-1])
                pipe.expire(self._index(event.transaction_id), self._ttl)
                for keys in entity_keys:
                    pipe.evalsha(self._observe.sha, len(keys), *keys, *args[1:-1])

        replies = iter(self._pipeline("observe", queue))
        out = []
        for event, (entity_keys, pairs, _) in zip(events, calls, strict=True):
            next(replies)  # the index's SET
            next(replies)  # and EXPIRE
            entity_replies = [next(replies) for _ in entity_keys]
            out.append(self._features(entity_replies, event, pairs, needed))
        return out

    def _observe_call(self, event: Event) -> _Call:
        """Keys of each entity, its entities and the script's arguments for one event.

        The arguments are framed by the timestamp and the index's entity list, which the
        index write uses and the script does not.
        """
        txid = event.transaction_id
        pairs = base.entities_of(event)
        entity_keys = []
        for kind, ident in pairs:
            start = self._entity(kind, ident)
            entity_keys.append([start + "h", start + "f", start + "i"])
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
        return entity_keys, pairs, [stamp, stamp, txid, member, *self._fixed, ents]

    def _features(
        self,
        replies: list[bytes],
        event: Event,
        pairs: list[tuple[str, str]],
        needed: frozenset[str] | None,
    ) -> Features:
        """The entity scripts' replies as each entity's features."""
        txid = event.transaction_id
        features: Features = {}
        duplicate: list[str] = []
        nwin = self._nwin
        for reply, (kind, _) in zip(replies, pairs, strict=True):
            fields = reply.split(b" ")
            status = fields[0]
            if status == b"dup":
                duplicate.append(kind)
            elif status == b"late":
                log.warning(
                    "transaction %s is more than %.0f s behind the newest of its %s: "
                    "scored, not recorded for it",
                    txid,
                    self.config.allowed_lateness,
                    kind,
                )
            raws: list[base.Raw] = []
            at = 1
            for _w in range(nwin):
                c, s, h, f, t, m, n = fields[at : at + 7]
                raws.append((int(c), int(s), float(h), int(f), int(t), int(m), int(n)))
                at += 7
            gap = float(fields[at]) if fields[at] else None
            features[kind] = base.select(self._builder.build(kind, event.amount, raws, gap), needed)
        if duplicate:
            log.info(
                "transaction %s already recorded for %s: scored, not counted again",
                txid,
                ", ".join(duplicate),
            )
        return features

    def observe_labelled(
        self,
        events: Sequence[Event],
        labels: Sequence[base.Label],
        needed: frozenset[str] | None = None,
    ) -> tuple[list[Features], list[LabelOutcome]]:
        """See `StateStore.observe_labelled`: `observe_many` and `record_label` in turn."""
        return base.observe_in_turn(self, events, labels, needed)

    def record_label(
        self, transaction_id: str, is_fraud: bool, place: base.LabelPlace | None = None
    ) -> LabelOutcome:
        """See `detector.state.StateStore.record_label`: the index, then each entity (`place`
        is not needed: the index holds the same)."""
        client = self._guard("label", self._connect)
        index = self._guard("label", lambda: client.get(self._index(transaction_id)))
        outcomes: set[str] = set()
        if index is not None:
            entities = [start.decode().partition(":") for start in index.split(b"\0")[1:]]
            args = ["1" if is_fraud else "0", transaction_id, str(self._ttl)]

            def queue(pipe: Any) -> None:
                for kind, _, ident in entities:
                    start = self._entity(kind, ident)
                    pipe.evalsha(self._label.sha, 2, start + "f", start + "i", *args)

            outcomes = {reply.decode() for reply in self._pipeline("label", queue)}
        outcome = base.combine_outcomes(outcomes)
        base.log_label(log, transaction_id, is_fraud, outcome)
        return outcome

    def drop(self) -> None:
        """Delete every key under this store's prefix, on every node (a replay's own state)."""
        client = self._guard("drop", self._connect)

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
        """Close the connections."""
        if self._client is not None:
            self._client.close()
            self._client = None
