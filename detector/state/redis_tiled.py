"""The tiled state store in Redis or Valkey: window features at a cost flat in history.

`detector.state.redis_store` keeps each entity's transactions and scans them, so a busy
merchant costs more with every transaction. This store implements the tiled definition of
`detector.state.tiles` instead (checked against a brute-force reading of it): an
entity keeps time tiles and, per window, running sums that a transaction moves by the tiles
entering or leaving it. Everything else is `RedisStore`'s: one pipeline per batch, one script
per entity and transaction on the node that holds the entity, the label index, timeouts
and errors.

Keys (``P`` is the prefix, ``E`` the entity's hash tag ``<kind>:<id>``), all in one slot
per entity and expiring ``retention`` seconds of wall-clock time after their last write:

- ``P{E}:t``: hash of the entity's windows.
  ``m`` = newest timestamp, lowest and highest generation (below), then per window its
  running sums: end tile, whether valid, count, sum, fraud, max, whether the max is still
  valid, and the three distinct sums (doubles, `struct`-packed).
  ``r`` = the `RING` greatest (timestamp, transaction_id), greatest first.
  ``o<L>`` = the indexes of the tiles kept at level L (one level per tile width), sorted.
  ``<L>:<i>`` = tile i of level L: count, sum, max, fraud, and the number of terminals,
  merchants and countries whose newest tile it is.
- ``P{E}:g<n>``: hash of generation n, the transactions and attribute values of event
  times in [n*G, (n+1)*G) with G = retention + the widest tile: ``i<transaction_id>`` =
  (timestamp, micros, label) for redelivery and labels (found in the other generations
  still linked when a redelivery or a label carries another timestamp than the one
  recorded), ``v<t|m|c><value>`` = the value's newest tile per level. A generation is
  unlinked as soon as the entity's newest is past its end by G, so ids and values cost
  memory for about two retentions, however busy.
- ``P{t:<transaction_id>}``: the label index, as in `RedisStore`.

A script reads the entity's hash once (meta, ring, tile lists, the tiles of its timestamp),
its generation once (id, values), the tiles that enter or leave a window once, and writes
each hash once; only a max whose tile left a window reads that window's tiles again. A
window that no reader reads (`declare_reads`: the merchant's and most of the card's, for the
shipped detector) is not kept up to date: it is marked stale and filled afresh from its
tiles if a reader comes; what is recorded does not change.

On a single node of Redis 7 or Valkey the scripts are loaded as a function library and run
with FCALL, so their constants and helpers are built once and not on every call; a cluster,
or an older server, runs them as scripts (EVALSHA). Batches of many transactions stream to a
single node in chunks (`RedisStore._pipeline`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import redis
import redis.cluster
import redis.exceptions

from detector.state import base
from detector.state.base import DISTINCT, Event, Features, LabelOutcome, StateConfig
from detector.state.redis_store import RedisStore
from detector.state.tiles import RING, levels, tile_width

__all__ = ["RedisTiledStore"]

log = logging.getLogger(__name__)

# Shared by both scripts, after the configuration's constants (see `RedisTiledStore._header`):
# meta, tiles, and the tiles' names.
_LIB = r"""
local NEG = -1 / 0

-- meta: newest, lowest and highest generation, then per window w from WB[w] + 1 on its
-- cache {end tile, valid, count, sum, fraud, max, max valid, distinct 1..3}, kept flat.
local function read_meta(s)
  if not s then return nil, nil, nil, {unpack(META0)} end
  local m = {struct.unpack(META, s)}
  return m[1], m[2], m[3], m
end

local function write_meta(m, newest, glo, ghi)
  m[1], m[2], m[3] = newest, glo, ghi
  return struct.pack(META, unpack(m, 1, NMETA))
end

local function untile(s)
  local c, t, h, f, d1, d2, d3 = struct.unpack(TILE, s)
  return {c, t, h, f, d1, d2, d3}
end

local function pack_tile(t)
  return struct.pack(TILE, t[1], t[2], t[3], t[4], t[5], t[6], t[7])
end

local function tile_name(L, i) return string.format('%d:%d', L, i) end

-- Tiles of level L before this index are forgotten, for an entity whose newest is `newest`.
local function forgotten(L, newest)
  if newest == nil then return NEG end
  return math.floor((newest - LKEEP[L]) / WIDTH[L])
end

-- A transaction's id row, and its generation's key, from the generations still linked other
-- than `skip`: a redelivery or a label may carry another timestamp than the one recorded.
-- Only generations that may hold a row within the retention of `newest` are read.
local function find_id(gbase, field, newest, glo, ghi, skip)
  for g = ghi, glo, -1 do
    local key = gbase .. string.format('%d', g)
    if key ~= skip and (g + 1) * GSPAN > newest - KEEP then
      local row = redis.call('HGET', key, field)
      if row then return row, key end
    end
  end
  return nil, nil
end
"""

_OBSERVE = r"""
-- One entity. KEYS: its windows' hash, then its generations n-1, n, n+1 (n of the timestamp).
-- ARGV: txid, timestamp, micros, amount, generation key base, what is read (a '1' or '0'
-- per window, then one for seconds_since_last), then the field of each attribute's value
-- (``v``, the attribute's letter, the value).
local main = KEYS[1]
local txid, ts, micro, amount = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]),
  tonumber(ARGV[4])
local gbase = ARGV[5]
-- A window nobody reads is not kept up to date: it is marked stale, and filled afresh from
-- its tiles when a reader comes. What is recorded is the same either way.
local read = {string.byte(ARGV[6], 1, NWIN)}
-- Nothing read of this entity (no '1' at all): the reply is the status alone.
local quiet = not string.find(ARGV[6], '1', 1, true)
-- The timestamp's generation and tiles, as the client computes them (floor of a quotient).
local gen = math.floor(ts / GSPAN)
local kk = {}
for L = 1, NLEV do kk[L] = math.floor(ts / WIDTH[L]) end
local nattr = #ARGV - 6
local slot, vfield = {}, {}
for a = 1, nattr do
  local f = ARGV[6 + a]
  slot[a], vfield[a] = SLOT[string.byte(f, 2)], f
end

local fields = {'m', 'r'}
for L = 1, NLEV do
  fields[2 + L] = 'o' .. L
  fields[2 + NLEV + L] = tile_name(L, kk[L])
end
local got = redis.call('HMGET', main, unpack(fields))
local newest, glo, ghi, m = read_meta(got[1])
local ring = got[2] or ''
local order, tiles, dirty = {}, {}, {}
for L = 1, NLEV do
  order[L] = got[2 + L] or ''
  tiles[L] = {}
  dirty[L] = {}
  local s = got[2 + NLEV + L]
  if s then tiles[L][kk[L]] = untile(s) else tiles[L][kk[L]] = false end
end

-- order[L]: the indexes of the kept tiles, ascending, 8 bytes each. Searches start from the
-- newest end, where transactions mostly fall.
local function at_(L, pos) return (struct.unpack('<d', order[L], pos * 8 - 7)) end
local function above(L, x)  -- the first position holding a tile > x
  local hi, step, lo = #order[L] / 8 + 1, 1, 1
  while true do
    local pos = hi - step
    if pos < 1 then break end
    if at_(L, pos) > x then
      hi, step = pos, step * 2
    else
      lo = pos + 1
      break
    end
  end
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if at_(L, mid) > x then hi = mid else lo = mid + 1 end
  end
  return lo
end
-- Tiles i with low < i <= high that may be kept: the range is first cut to the oldest and
-- newest kept tiles, then all of a short one, else those listed.
local function span(L, low, high)
  local out = {}
  local size = #order[L] / 8
  if size == 0 then return out end
  local oldest, newest_ = at_(L, 1), at_(L, size)  -- no tile outside these is kept
  if oldest > low + 1 then low = oldest - 1 end
  if newest_ < high then high = newest_ end
  if high - low <= 8 then
    for i = low + 1, high do out[#out + 1] = i end
    return out
  end
  local first, last = above(L, low), above(L, high) - 1
  if last < first then return out end
  out = {struct.unpack('<' .. string.rep('d', last - first + 1), order[L], first * 8 - 7)}
  out[#out] = nil
  return out
end

local pending, pl, pi = {}, {}, {}
local function want(L, list)
  local known = tiles[L]
  for _, i in ipairs(list) do
    if known[i] == nil then
      known[i] = false
      local r = #pending + 1
      pending[r], pl[r], pi[r] = tile_name(L, i), L, i
    end
  end
end
local function fetch()
  if #pending == 0 then return end
  local rows = redis.call('HMGET', main, unpack(pending))
  for r = 1, #pending do
    if rows[r] then tiles[pl[r]][pi[r]] = untile(rows[r]) end
  end
  pending, pl, pi = {}, {}, {}
end

-- Status: a held id is a redelivery; a timestamp too far behind the newest is late.
local status = 'new'
local late = newest ~= nil and ts < newest - LATENESS
local gfields = {'i' .. txid}
if not late then
  for a = 1, nattr do gfields[1 + a] = vfield[a] end
end
local grow = redis.call('HMGET', KEYS[3], unpack(gfields))
local idrow = grow[1]
if not idrow and newest ~= nil then
  idrow = find_id(gbase, 'i' .. txid, newest, glo, ghi, KEYS[3])
end
local held = nil
if idrow and newest ~= nil then
  local rts, rmicro, rlabel = struct.unpack('<ddd', idrow)
  if rts > newest - KEEP then held = {rts, rmicro, rlabel} end
end
if held then status = 'dup' elseif late then status = 'late' end
if held and held[1] ~= ts then
  -- A redelivery is decided at the timestamp it was recorded with, whatever its own.
  ts = held[1]
  gen = math.floor(ts / GSPAN)
  for L = 1, NLEV do
    kk[L] = math.floor(ts / WIDTH[L])
    want(L, {kk[L]})
  end
  fetch()
end

-- Each attribute value's newest tile per level, from the generations that may hold it.
local vrec = {}
if status == 'new' and nattr > 0 then
  for a = 1, nattr do
    if grow[1 + a] then vrec[a] = {struct.unpack(VALUES, grow[1 + a])} end
  end
  -- A value's record in a generation is at least its records in earlier ones, so the
  -- generation before is read only for the values this one lacks.
  if newest ~= nil and gen - 1 >= glo and gen - 1 <= ghi then
    local miss, ma = {}, {}
    for a = 1, nattr do
      if not vrec[a] then miss[#miss + 1], ma[#ma + 1] = vfield[a], a end
    end
    if #miss > 0 then
      local rows = redis.call('HMGET', KEYS[2], unpack(miss))
      for r = 1, #miss do
        if rows[r] then vrec[ma[r]] = {struct.unpack(VALUES, rows[r])} end
      end
    end
  end
  if newest ~= nil and gen + 1 >= glo and gen + 1 <= ghi then
    local rows = redis.call('HMGET', KEYS[4], unpack(vfield))
    for a = 1, nattr do
      if rows[a] then
        local r = {struct.unpack(VALUES, rows[a])}
        local v = vrec[a]
        if v == nil then
          vrec[a] = r
        else
          for L = 1, NLEV do if r[L] > v[L] then v[L] = r[L] end end
        end
      end
    end
  end
end

local F, Fn = {}, {}
local next_newest = newest
if status == 'new' and (newest == nil or ts > newest) then next_newest = ts end
for L = 1, NLEV do
  F[L] = forgotten(L, newest)
  Fn[L] = forgotten(L, next_newest)
end

-- Plan every window's reads, and the tiles values leave, then read them at once.
-- A window's sums are filled afresh, or moved: tiles `leave` and tiles `enter`. Tiles
-- before F are gone already (a late transaction's window may reach them), and a
-- late or redelivered transaction's moved sums are not saved.
local mode, leave, enter, beyond = {}, {}, {}, {}
for w = 1, NWIN do
  local L, n, b = WL[w], WN[w], WB[w]
  local k, e = kk[L], m[b + 1]
  if read[w] ~= 49 then
    m[b + 2] = 0
  elseif m[b + 2] ~= 1 or math.abs(k - e) >= n then
    mode[w] = 'fill'
    enter[w] = span(L, k - n, k)
    if beyond[L] == nil then beyond[L] = span(L, k, math.huge) end
    want(L, enter[w])
    want(L, beyond[L])
  else
    mode[w] = 'move'
    if k > e then
      leave[w], enter[w] = span(L, e - n, k - n), span(L, e, k)
    elseif k < e then
      leave[w], enter[w] = span(L, k, e), span(L, k - n, e - n)
    else
      leave[w], enter[w] = {}, {}
    end
    want(L, leave[w])
    want(L, enter[w])
  end
end
if status == 'new' then
  for a = 1, nattr do
    local v = vrec[a]
    if v then
      for L = 1, NLEV do
        if kk[L] > v[L] and v[L] >= Fn[L] then want(L, {v[L]}) end
      end
    end
  end
end
fetch()

-- Add (sign 1) or take out (-1) tiles from a window's count, sum, fraud and max, and
-- distinct sums when `distinct`.
local function take(b, known, list, sign, distinct)
  for _, i in ipairs(list) do
    local t = known[i]
    if t then
      m[b + 3] = m[b + 3] + sign * t[1]
      m[b + 4] = m[b + 4] + sign * t[2]
      m[b + 5] = m[b + 5] + sign * t[4]
      if sign > 0 then
        if t[3] > m[b + 6] then m[b + 6] = t[3] end
      elseif t[3] >= m[b + 6] then
        m[b + 7] = 0
      end
      if distinct then
        m[b + 8] = m[b + 8] + sign * t[5]
        m[b + 9] = m[b + 9] + sign * t[6]
        m[b + 10] = m[b + 10] + sign * t[7]
      end
    end
  end
end

local stale = {}
for w = 1, NWIN do
  local L, n, b = WL[w], WN[w], WB[w]
  local k, known = kk[L], tiles[L]
  if mode[w] == 'move' then
    local e = m[b + 1]
    if k > e then
      take(b, known, leave[w], -1, true)
      take(b, known, enter[w], 1, false)
    elseif k < e then
      take(b, known, leave[w], -1, false)
      take(b, known, enter[w], 1, true)
    end
    m[b + 1] = k
    if m[b + 7] == 0 then  -- the max left: read the window's tiles for it
      stale[w] = span(L, k - n, k)
      want(L, stale[w])
    end
  elseif mode[w] == 'fill' then
    m[b + 1], m[b + 2], m[b + 3], m[b + 4], m[b + 5] = k, 1, 0, 0, 0
    m[b + 6], m[b + 7], m[b + 8], m[b + 9], m[b + 10] = NEG, 1, 0, 0, 0
    take(b, known, enter[w], 1, true)
    for _, i in ipairs(beyond[L]) do
      local t = known[i]
      if t and i > k then
        m[b + 8] = m[b + 8] + t[5]
        m[b + 9] = m[b + 9] + t[6]
        m[b + 10] = m[b + 10] + t[7]
      end
    end
  end
end
if next(stale) ~= nil then
  fetch()
  for w, list in pairs(stale) do
    local b, known = WB[w], tiles[WL[w]]
    local high = NEG
    for _, i in ipairs(list) do
      local t = known[i]
      if t and t[3] > high then high = t[3] end
    end
    m[b + 6], m[b + 7] = high, 1
  end
end

-- The reply: the status's letter, then per window (count, sum, max, fraud, distinct 1..3)
-- and seconds_since_last (NaN when none) as doubles; zeros for a window not read.
local out, o = nil, 0
if not quiet then
  out = {unpack(REPLY0)}  -- built at its full size at once
  for w = 1, NWIN do
    if mode[w] then
      local b = WB[w]
      local count, total, fraud = m[b + 3], m[b + 4], m[b + 5]
      if held and kk[WL[w]] >= F[WL[w]] then  -- a redelivery leaves its own amount out
        count = count - 1
        total = total - held[2]
        if held[3] == 1 then fraud = fraud - 1 end
      end
      out[o + 1], out[o + 2], out[o + 3], out[o + 4] = count, total, m[b + 6], fraud
      out[o + 5], out[o + 6], out[o + 7] = m[b + 8], m[b + 9], m[b + 10]
    end
    o = o + 7
  end
end

-- seconds_since_last, from the ring of the greatest (timestamp, id), greatest first.
-- Ids compare by bytes, like Python's str order on UTF-8 (Lua's `<` follows the locale).
local function bytes_lt(a, b)
  local n = math.min(#a, #b)
  for i = 1, n do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end
local pos, last = 1, nil
while pos <= #ring do
  local s, len = struct.unpack('<dH', ring, pos)
  if s < ts or (s == ts and bytes_lt(string.sub(ring, pos + 10, pos + 9 + len), txid)) then
    last = s
    break
  end
  pos = pos + 10 + len
end
if out then
  if last ~= nil and last > ts - LOOKBACK then out[o + 1] = ts - last else out[o + 1] = 0 / 0 end
end

if status == 'new' then
  local gw = {'i' .. txid, struct.pack('<ddd', ts, micro, -1)}
  -- Forget tiles behind each level's horizon, and the windows' sums that reach them.
  local gone = {}
  for L = 1, NLEV do
    local cut = 0
    if #order[L] > 0 and at_(L, 1) < Fn[L] then cut = above(L, Fn[L] - 1) - 1 end
    if cut > 0 then
      for q = 1, cut do gone[#gone + 1] = tile_name(L, at_(L, q)) end
      order[L] = string.sub(order[L], cut * 8 + 1)
      dirty[L].order = true
    end
  end
  for w = 1, NWIN do
    local b = WB[w]
    if m[b + 2] == 1 and m[b + 1] - WN[w] + 1 < Fn[WL[w]] then m[b + 2] = 0 end
  end
  for L = 1, NLEV do
    local j = kk[L]
    local t = tiles[L][j]
    if not t then
      t = {0, 0, NEG, 0, 0, 0, 0}
      tiles[L][j] = t
      local size = #order[L]
      if size == 0 or at_(L, size / 8) < j then  -- the newest tile: mostly so
        order[L] = order[L] .. struct.pack('<d', j)
      else
        local q = above(L, j)
        order[L] = string.sub(order[L], 1, q * 8 - 8) .. struct.pack('<d', j) ..
          string.sub(order[L], q * 8 - 7)
      end
      dirty[L].order = true
    end
    t[1] = t[1] + 1
    t[2] = t[2] + micro
    if amount > t[3] then t[3] = amount end
    dirty[L][j] = true
  end
  for w = 1, NWIN do
    local b, j = WB[w], kk[WL[w]]
    if m[b + 2] == 1 and m[b + 1] - WN[w] < j and j <= m[b + 1] then
      m[b + 3] = m[b + 3] + 1
      m[b + 4] = m[b + 4] + micro
      if amount > m[b + 6] then m[b + 6] = amount end
    end
  end
  -- A value counts in its newest tile per level: move its count there.
  for a = 1, nattr do
    local v, s = vrec[a], slot[a]
    local moved = false
    local rec = {}
    for L = 1, NLEV do
      local j, o = kk[L], v and v[L]
      if o == nil or j > o then
        moved = true
        rec[L] = j
        local t = tiles[L][j]
        t[4 + s] = t[4 + s] + 1
        local old = nil
        if o ~= nil and o >= Fn[L] and tiles[L][o] then
          old = tiles[L][o]
          old[4 + s] = old[4 + s] - 1
          dirty[L][o] = true
        end
        for _, w in ipairs(LW[L]) do
          local b = WB[w]
          if m[b + 2] == 1 then
            local edge = m[b + 1] - WN[w]
            if j > edge then m[b + 7 + s] = m[b + 7 + s] + 1 end
            if old and o > edge then m[b + 7 + s] = m[b + 7 + s] - 1 end
          end
        end
      else
        rec[L] = o
      end
    end
    if moved then
      gw[#gw + 1] = vfield[a]
      gw[#gw + 1] = struct.pack(VALUES, unpack(rec))
    end
  end
  -- The ring takes the transaction in its place and keeps the greatest.
  ring = string.sub(ring, 1, pos - 1) .. struct.pack('<dH', ts, #txid) .. txid ..
    string.sub(ring, pos)
  local q, n = 1, 0
  while q <= #ring and n < RING do
    local _, len = struct.unpack('<dH', ring, q)
    q = q + 10 + len
    n = n + 1
  end
  ring = string.sub(ring, 1, q - 1)
  -- Generations wholly behind the retention go at once (keys of this entity's slot).
  if glo == nil or gen < glo then glo = gen end
  if ghi == nil or gen > ghi then ghi = gen end
  local dead = math.floor((next_newest - KEEP - WIDEST) / GSPAN) - 1
  for g = glo, math.min(dead, ghi) do
    redis.call('UNLINK', gbase .. string.format('%d', g))
  end
  if dead + 1 > glo then glo = dead + 1 end

  local wr = {'m', write_meta(m, next_newest, glo, ghi), 'r', ring}
  for L = 1, NLEV do
    for i, _ in pairs(dirty[L]) do
      if i == 'order' then
        wr[#wr + 1] = 'o' .. L
        wr[#wr + 1] = order[L]
      else
        wr[#wr + 1] = tile_name(L, i)
        wr[#wr + 1] = pack_tile(tiles[L][i])
      end
    end
  end
  if #gone > 0 then redis.call('HDEL', main, unpack(gone)) end
  redis.call('HSET', main, unpack(wr))
  redis.call('HSET', KEYS[3], unpack(gw))
  redis.call('EXPIRE', main, TTL)
  redis.call('EXPIRE', KEYS[3], TTL)
end
if quiet then return STATUS[status] end
return STATUS[status] .. struct.pack(REPLY, unpack(out, 1, o + 1))
"""

_LABEL = r"""
-- One entity. KEYS: its windows' hash, the generation of the transaction's timestamp.
-- ARGV: txid, label (1 or 0), generation key base. Records the label once for this entity,
-- in the tiles of the timestamp it recorded.
local txid, label, gbase = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local field = 'i' .. txid
local where = KEYS[2]
local held = redis.call('HGET', where, field)
if not held then
  local newest, glo, ghi = read_meta(redis.call('HGET', KEYS[1], 'm'))
  if newest == nil then return 'unknown' end
  held, where = find_id(gbase, field, newest, glo, ghi, KEYS[2])
  if not held then return 'unknown' end
end
local ts, micro, old = struct.unpack('<ddd', held)
-- Most labels say "not fraud" of a transaction never labelled: they change no count, and
-- read only the newest timestamp of the meta.
local delta = (label == 1 and 1 or 0) - (old == 1 and 1 or 0)
if delta == 0 then
  local meta = redis.call('HGET', KEYS[1], 'm')
  if not meta or not (ts > struct.unpack('<d', meta) - KEEP) then return 'unknown' end
  if old == label then return 'duplicate' end
else
  local fields, tile = {'m'}, {}
  for L = 1, NLEV do
    tile[L] = math.floor(ts / WIDTH[L])
    fields[1 + L] = tile_name(L, tile[L])
  end
  local got = redis.call('HMGET', KEYS[1], unpack(fields))
  local newest, glo, ghi, m = read_meta(got[1])
  if newest == nil or not (ts > newest - KEEP) then return 'unknown' end
  local wr = {}
  for L = 1, NLEV do
    local k = tile[L]
    if got[1 + L] and k >= forgotten(L, newest) then
      local t = untile(got[1 + L])
      t[4] = t[4] + delta
      wr[#wr + 1] = fields[1 + L]
      wr[#wr + 1] = pack_tile(t)
      for w = 1, NWIN do
        local b = WB[w]
        if WL[w] == L and m[b + 2] == 1 and m[b + 1] - WN[w] < k and k <= m[b + 1] then
          m[b + 5] = m[b + 5] + delta
        end
      end
    end
  end
  wr[#wr + 1] = 'm'
  wr[#wr + 1] = write_meta(m, newest, glo, ghi)
  redis.call('HSET', KEYS[1], unpack(wr))
  redis.call('EXPIRE', KEYS[1], TTL)
end
redis.call('HSET', where, field, struct.pack('<ddd', ts, micro, label))
redis.call('EXPIRE', where, TTL)
if old == -1 then return 'applied' end
return 'changed'
"""

#: Each tracked attribute's slot in a tile and in the scripts' replies, and its letter.
_SLOTS = {"terminal": (1, "t"), "merchant": (2, "m"), "country": (3, "c")}


def _tile(timestamp: float, width: int) -> int:
    """Index of the tile of width `width` that holds a timestamp."""
    return math.floor(timestamp / width)


class RedisTiledStore(RedisStore):
    """Tiled window state in Redis or Valkey, single node or cluster (see the module doc).

    Shares `RedisStore`'s connection, pipeline, errors, label index, `drop`, `check` and
    `close`; only the scripts and their arguments differ.
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
        super().__init__(
            config, url, prefix=prefix, connect_timeout=connect_timeout, timeout=timeout
        )
        #: Tile widths, finest first, each with how long its tiles are kept.
        self._levels = levels(config)
        #: Seconds of event time per generation of ids and values.
        self._span = math.ceil(config.keep + self._levels[-1][0])
        #: The observe script's reply after its status letter.
        self._reply = struct.Struct(f"<{7 * len(config.windows) + 1}d")
        #: What `declare_reads` said is read of each kind (None: all).
        self._reads: dict[str, frozenset[str] | None] | None = None
        #: Per kind, the features of each window.
        self._window_features = {
            kind: [
                base.feature_names([window], kind) - {"seconds_since_last"}
                for window in config.windows
            ]
            for kind in DISTINCT
        }
        #: Per `needed`, each kind's script argument of the windows it reads.
        self._masks: dict[frozenset[str] | None, dict[str, str]] = {}
        header = self._header()
        self._observe_source = header + _LIB + _OBSERVE
        self._label_source = header + _LIB + _LABEL
        # The same scripts as a function library (Redis 7, Valkey): its constants, tables
        # and helpers are built once when loaded, not on every call as a script's are.
        # Named by its text, so stores of different configurations share a server.
        name = (
            "fraud_tiled_"
            + hashlib.sha1((header + _LIB + _OBSERVE + _LABEL).encode()).hexdigest()[:16]
        )
        self._functions = {"observe": f"{name}_observe", "label": f"{name}_label"}
        self._library = (
            f"#!lua name={name}\n{header}{_LIB}"
            f"local function observe(KEYS, ARGV)\n{_OBSERVE}\nend\n"
            f"local function label(KEYS, ARGV)\n{_LABEL}\nend\n"
            f"redis.register_function('{name}_observe', observe)\n"
            f"redis.register_function('{name}_label', label)\n"
        )
        #: Whether the server runs the library (`_load_scripts`), else the scripts.
        self._fcall = False

    def _header(self) -> str:
        """The configuration as the scripts' constants: fewer arguments to send and parse."""
        config = self.config
        level_of = {width: level for level, (width, _) in enumerate(self._levels, 1)}

        def table(values: Sequence[object]) -> str:
            return "{" + ", ".join(str(value) for value in values) + "}"

        nlev, nwin = len(self._levels), len(config.windows)
        window_level = [level_of[tile_width(window)] for window in config.windows]
        constants = {
            "NLEV": nlev,
            "WIDTH": table([width for width, _ in self._levels]),
            "LKEEP": table([repr(float(keep)) for _, keep in self._levels]),
            "NWIN": nwin,
            "WB": table([3 + 10 * w for w in range(nwin)]),
            "NMETA": 3 + 10 * nwin,
            "META": f"'<{'d' * (3 + 10 * nwin)}'",
            "TILE": "'<ddddddd'",
            "VALUES": f"'<{'d' * nlev}'",
            "REPLY": f"'<{'d' * (7 * nwin + 1)}'",
            # A new entity's meta (window caches: end tile 0, not valid, sums 0, max -inf,
            # max valid), and a reply's slots.
            "META0": table([0, 0, 0, *([0, 0, 0, 0, 0, "-1/0", 1, 0, 0, 0] * nwin)]),
            "REPLY0": table([0] * (7 * nwin + 1)),
            "STATUS": "{new = 'n', dup = 'd', late = 'l'}",
            "WL": table(window_level),
            # The windows of each level.
            "LW": table(
                [
                    table([w for w, level in enumerate(window_level, 1) if level == wanted])
                    for wanted in range(1, nlev + 1)
                ]
            ),
            "WN": table([window // tile_width(window) for window in config.windows]),
            "LATENESS": repr(float(config.allowed_lateness)),
            "KEEP": repr(float(config.keep)),
            "LOOKBACK": repr(float(config.keep - config.allowed_lateness)),
            "TTL": self._ttl,
            "GSPAN": self._span,
            "WIDEST": self._levels[-1][0],
            "RING": RING,
            "SLOT": "{"
            + ", ".join(f"[{ord(letter)}] = {slot}" for slot, letter in _SLOTS.values())
            + "}",
        }
        return "".join(f"local {name} = {value}\n" for name, value in constants.items())

    def declare_reads(self, reads: Mapping[str, frozenset[str] | None]) -> None:
        """Keep up to date only the windows read of each kind (`base.wanted`); the others
        are filled afresh from their tiles if a reader comes."""
        self._reads = dict(reads)
        self._masks = {}

    def _mask(self, needed: frozenset[str] | None) -> dict[str, str]:
        """What each kind reads for `needed`: '1' or '0' per window, in order, then one
        for seconds_since_last."""
        masks = {}
        for kind in DISTINCT:
            wanted = base.wanted(self._reads, kind, needed)
            masks[kind] = "".join(
                "1" if wanted is None or not wanted.isdisjoint(names) else "0"
                for names in self._window_features[kind]
            ) + ("1" if wanted is None or "seconds_since_last" in wanted else "0")
        if len(self._masks) < 64:
            self._masks[needed] = masks
        return masks

    def _features(
        self,
        replies: list[bytes],
        event: Event,
        pairs: list[tuple[str, str]],
        needed: frozenset[str] | None,
    ) -> Features:
        """The entity scripts' replies as each entity's features: a status letter, then
        doubles (`_OBSERVE`'s reply)."""
        txid = event.transaction_id
        features: Features = {}
        duplicate: list[str] = []
        unpack = self._reply.unpack_from
        for reply, (kind, _) in zip(replies, pairs, strict=True):
            status = reply[:1]
            if status == b"d":
                duplicate.append(kind)
            elif status == b"l":
                log.warning(
                    "transaction %s is more than %.0f s behind the newest of its %s: "
                    "scored, not recorded for it",
                    txid,
                    self.config.allowed_lateness,
                    kind,
                )
            if len(reply) == 1:  # nothing read of it
                features[kind] = {}
                continue
            values = unpack(reply, 1)
            raws: list[base.Raw] = []
            for at in range(0, len(values) - 1, 7):
                c, s, h, f, t, m, n = values[at : at + 7]
                raws.append((int(c), int(s), h, int(f), int(t), int(m), int(n)))
            gap = values[-1]
            features[kind] = base.select(
                self._builder.build(kind, event.amount, raws, None if math.isnan(gap) else gap),
                base.wanted(self._reads, kind, needed),
            )
        if duplicate:
            log.info(
                "transaction %s already recorded for %s: scored, not counted again",
                txid,
                ", ".join(duplicate),
            )
        return features

    def _generation(self, start: str, timestamp: float, offset: int = 0) -> str:
        """Key of the generation of a timestamp (or `offset` generations from it)."""
        return f"{start}g{_tile(timestamp, self._span) + offset}"

    def observe_many(
        self, events: Sequence[Event], needed: frozenset[str] | None = None
    ) -> list[Features]:
        """See `detector.state.base.StateStore.observe_many`: one pipeline for the batch."""
        return self.observe_labelled(events, (), needed)[0]

    def observe_labelled(
        self,
        events: Sequence[Event],
        labels: Sequence[base.Label],
        needed: frozenset[str] | None = None,
    ) -> tuple[list[Features], list[LabelOutcome]]:
        """See `detector.state.base.StateStore.observe_labelled`: one pipeline for the
        batch and its labels when every label has its place, else in turn."""
        if any(label.place is None for label in labels):
            return base.observe_in_turn(self, events, labels, needed)
        if not events and not labels:
            return [], []
        masks = self._masks.get(needed) or self._mask(needed)
        calls = [self._calls(event, masks) for event in events]

        def queue(pipe: Any) -> None:
            call, function = self._caller(pipe, "observe")
            at = 0
            for position, (event, (scripts, ents)) in enumerate(zip(events, calls, strict=True)):
                while at < len(labels) and labels[at].position <= position:
                    self._queue_label(pipe, labels[at])
                    at += 1
                index = self._index(event.transaction_id)
                pipe.set(index, repr(float(event.timestamp)) + "\0" + ents, ex=self._ttl)
                for keys, args in scripts:
                    call(function, len(keys), *keys, *args)
            for label in labels[at:]:
                self._queue_label(pipe, label)

        many = len(events) + len(labels) > 1
        replies = iter(self._pipeline("observe" if events else "label", queue, stream=many))
        out = []
        outcomes = []
        at = 0
        for position, (event, (scripts, _)) in enumerate(zip(events, calls, strict=True)):
            while at < len(labels) and labels[at].position <= position:
                outcomes.append(self._label_outcome(replies, labels[at]))
                at += 1
            next(replies)  # the index's SET
            entity_replies = [next(replies) for _ in scripts]
            out.append(self._features(entity_replies, event, base.entities_of(event), needed))
        for label in labels[at:]:
            outcomes.append(self._label_outcome(replies, label))
        return out, outcomes

    def _queue_label(self, pipe: Any, label: base.Label) -> None:
        """Queue the label script of each entity of a placed label."""
        assert label.place is not None
        ts, entities = label.place
        args = [label.transaction_id, "1" if label.is_fraud else "0"]
        for kind, ident in entities:
            start = self._entity(kind, ident)
            call, function = self._caller(pipe, "label")
            call(function, 2, start + "t", self._generation(start, ts), *args, start + "g")

    def _label_outcome(self, replies: Iterator[Any], label: base.Label) -> LabelOutcome:
        """A placed label's outcome from its entities' replies (`_queue_label`)."""
        assert label.place is not None
        said = {next(replies).decode() for _ in label.place.entities}
        outcome = base.combine_outcomes(said)
        base.log_label(log, label.transaction_id, label.is_fraud, outcome)
        return outcome

    def _load_scripts(self, client: redis.Redis | redis.cluster.RedisCluster) -> None:
        """The scripts, and on a single node the library of them: a cluster client would
        ask a node for the keys of every FCALL (COMMAND GETKEYS), so clusters run the
        scripts; so does a server without functions (before Redis 7)."""
        super()._load_scripts(client)
        if isinstance(client, redis.cluster.RedisCluster):
            return
        try:
            client.function_load(self._library, replace=True)
        except redis.exceptions.ResponseError as error:
            log.info("redis functions unavailable (%s): the store runs scripts", error)
            self._fcall = False
        else:
            self._fcall = True

    def _caller(self, pipe: Any, which: str) -> tuple[Callable[..., Any], str]:
        """How to queue the observe or label script on `pipe`: FCALL of the library's
        function, else EVALSHA of the script."""
        if self._fcall:
            return pipe.fcall, self._functions[which]
        script = self._observe if which == "observe" else self._label
        return pipe.evalsha, script.sha

    def _calls(
        self, event: Event, masks: dict[str, str]
    ) -> tuple[list[tuple[list[str], list[str]]], str]:
        """Keys and arguments of each entity's script, and the label index's entity list."""
        ts = event.timestamp
        head = [
            event.transaction_id,
            repr(float(ts)),
            str(base.micros(event.amount)),
            repr(float(event.amount)),
        ]
        scripts = []
        pairs = base.entities_of(event)
        for kind, ident in pairs:
            start = self._entity(kind, ident)
            keys = [start + "t", *(self._generation(start, ts, d) for d in (-1, 0, 1))]
            args = [*head, start + "g", masks[kind]]
            for attr in DISTINCT[kind]:
                value = getattr(event, attr)
                if value is not None:
                    args.append(f"v{_SLOTS[attr][1]}{value}")
            scripts.append((keys, args))
        return scripts, "\0".join(f"{kind}:{ident}" for kind, ident in pairs)

    def record_label(
        self, transaction_id: str, is_fraud: bool, place: base.LabelPlace | None = None
    ) -> LabelOutcome:
        """See `detector.state.StateStore.record_label`: each entity `place` names, else
        those of the label index's entry (one more round trip). The entity's generation is
        the one of the given timestamp; its tiles, those of the timestamp it recorded."""
        if place is None:
            client = self._guard("label", self._connect)
            index = self._guard("label", lambda: client.get(self._index(transaction_id)))
            if index is not None:
                stamp, *named = index.decode().split("\0")
                entities = tuple(
                    (kind, ident) for kind, _, ident in (e.partition(":") for e in named)
                )
                place = base.LabelPlace(float(stamp), entities)
        if place is None or not place.entities:
            base.log_label(log, transaction_id, is_fraud, LabelOutcome.UNKNOWN)
            return LabelOutcome.UNKNOWN
        label = base.Label(0, transaction_id, is_fraud, place)
        return self.observe_labelled((), [label])[1][0]
