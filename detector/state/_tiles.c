/* One entity's tiles for the tiled memory store, in C (optional: `make native`).
 *
 * The same state and steps as `_Entity` and `TiledMemoryStore._step`, `_record` and
 * `_move_fraud` in `detector.state.memory_tiled`, whose code is the specification (and the
 * definition is `detector.state.tiles`): the tile property test runs against both. In
 * Python every tile, window sum, id row and queue entry is a list or tuple of boxed numbers;
 * here they are C structs in a few arrays (an id the entity holds: a 32-byte row of a hash
 * table; a tile: 56 bytes), and the feature dicts are built here too, so a transaction of
 * three entities costs about a tenth of the Python path's time, the store under half its memory.
 *
 * Layout(widths, keeps, window_levels, window_tiles, keep, lateness, lookback, value_keep)
 *   The store's configuration, shared by its entities: per tile level its width in seconds
 *   and keep_g (finest first), per window its level and its length in tiles, then the
 *   retention, allowed lateness, seconds_since_last's lookback and how long a value is kept.
 *
 * Plan(slots, keys, gap_key)
 *   One entity kind's features for one set of wanted names: the attribute slots the kind
 *   tracks (0 terminal, 1 merchant, 2 country), per window a tuple of 10 names or None
 *   (count, sum, mean, max, amount_ratio, fraud_count, fraud_share, then the distinct
 *   terminals, merchants and countries) and the name of seconds_since_last or None. The
 *   dict a step returns is `select(FeatureBuilder.build(...), wanted)`, key order included,
 *   with the same floats.
 *
 * Entity(layout)
 *   step(plan, txid, ts, micros, amount, terminal, merchant, country) -> (status, features)
 *     `_step` then `FeatureBuilder.build`: status 0 recorded, 1 already held (a
 *     redelivery), 2 too late. Everything that can fail (bad arguments, memory) fails
 *     before anything changes.
 *   label(txid, label) -> "applied", "changed", "duplicate" or None (not held): one entity's
 *     part of `_record_label`, with `_move_fraud`.
 *   holds(txid) -> bool, newest (float or None), export() -> the pieces of a Python
 *     `_Entity`, for the store to go on in Python.
 *
 * observe(layout, kinds, maps, plans, event, micros)
 *   The store's loop over an event's entities in one call (see `tiles_observe`).
 *
 * Forgetting is the Python entity's, queue for queue, except for ids (see `ids_reserve`):
 * no result differs.
 *
 * Numbers. Tile indexes are C long longs: event times must be finite and within
 * `MAX_TIME` seconds of 1970 (the store goes back to Python beyond), and floor results
 * further out (a retention of centuries) are clamped where no index can reach them. Sums of
 * micros are 128-bit (no sum of 64-bit micros overflows them) and are divided as Python
 * divides ints. A tile holds fewer than 2**31 transactions (see `Tile`).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_LEVELS 3
#define MAX_WINDOWS 16
#define N_SLOTS 3
#define RING 8
/* Event times beyond this many seconds from 1970 are refused (OverflowError): every tile
 * index and difference of indexes is then far inside a long long. */
#define MAX_TIME 1e15
/* Where floor results are clamped: beyond every index, inside a long long. */
#define FAR ((long long)1 << 62)

/* The variables of a window, in the order of `Plan`'s keys and of `FeatureBuilder`. */
enum { V_COUNT, V_SUM, V_MEAN, V_MAX, V_RATIO, V_FRAUD, V_SHARE, V_DISTINCT };
#define N_VARS (V_DISTINCT + N_SLOTS)

enum { NEW, DUP, LATE };

typedef __int128 wide;

static PyObject *s_applied, *s_changed, *s_duplicate; /* LabelOutcome values */

/* --- numbers ----------------------------------------------------------------------------- */

/* math.floor of a finite double as a long long, clamped to +-FAR. */
static inline long long
floor_ll(double x)
{
    double f = floor(x);
    if (f >= (double)FAR)
        return FAR;
    if (f <= -(double)FAR)
        return -FAR;
    return (long long)f;
}

/* An exact integer as a Python int. */
static PyObject *
wide_to_long(wide v)
{
    if (v >= LLONG_MIN && v <= LLONG_MAX)
        return PyLong_FromLongLong((long long)v);
    int negative = v < 0;
    unsigned __int128 u = negative ? -(unsigned __int128)v : (unsigned __int128)v;
    PyObject *high = PyLong_FromUnsignedLongLong((unsigned long long)(u >> 64));
    PyObject *low = PyLong_FromUnsignedLongLong((unsigned long long)u);
    PyObject *shift = PyLong_FromLong(64);
    PyObject *shifted = NULL, *sum = NULL, *result = NULL;
    if (high && low && shift && (shifted = PyNumber_Lshift(high, shift)) &&
        (sum = PyNumber_Add(shifted, low)))
        result = negative ? PyNumber_Negative(sum) : (Py_INCREF(sum), sum);
    Py_XDECREF(high);
    Py_XDECREF(low);
    Py_XDECREF(shift);
    Py_XDECREF(shifted);
    Py_XDECREF(sum);
    return result;
}

/* a / b as Python divides ints: in doubles when both are at most 2**53 (exact operands, one
 * correctly rounded division), else through Python ints. -1.0 with an exception set on
 * failure. */
static double int_div_slow(wide a, long long b);

static inline double
int_div(wide a, long long b)
{
    const wide limit = (wide)1 << 53;
    if (-limit <= a && a <= limit && -limit <= b && b <= limit)
        return (double)(long long)a / (double)b;
    return int_div_slow(a, b);
}

static double
int_div_slow(wide a, long long b)
{
    PyObject *numerator = wide_to_long(a);
    PyObject *denominator = numerator ? PyLong_FromLongLong(b) : NULL;
    PyObject *quotient = denominator ? PyNumber_TrueDivide(numerator, denominator) : NULL;
    Py_XDECREF(numerator);
    Py_XDECREF(denominator);
    if (quotient == NULL)
        return -1.0;
    double result = PyFloat_AsDouble(quotient);
    Py_DECREF(quotient);
    return result;
}

/* --- Layout ------------------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    int n_levels, n_windows;
    double width[MAX_LEVELS];
    double keep_level[MAX_LEVELS];
    int level[MAX_WINDOWS];    /* each window's tile level */
    long long tiles[MAX_WINDOWS]; /* each window's length in tiles */
    int n_read[MAX_LEVELS];      /* per level how many windows read it, and which */
    int read[MAX_LEVELS][MAX_WINDOWS];
    double keep, lateness, lookback, value_keep;
} Layout;

static PyTypeObject LayoutType;

/* A tuple of 1 to `most` numbers into `out` (as doubles); -1 with an exception set. */
static Py_ssize_t
numbers(PyObject *tuple, double *out, Py_ssize_t most, const char *what)
{
    if (!PyTuple_Check(tuple) || PyTuple_GET_SIZE(tuple) < 1 || PyTuple_GET_SIZE(tuple) > most) {
        PyErr_Format(PyExc_ValueError, "Layout: %s: a tuple of 1 to %zd numbers", what, most);
        return -1;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(tuple); i++) {
        out[i] = PyFloat_AsDouble(PyTuple_GET_ITEM(tuple, i));
        if (out[i] == -1.0 && PyErr_Occurred())
            return -1;
    }
    return PyTuple_GET_SIZE(tuple);
}

static PyObject *
Layout_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *widths, *keeps, *levels, *tiles;
    double keep, lateness, lookback, value_keep;
    if (!PyArg_ParseTuple(args, "OOOOdddd:Layout", &widths, &keeps, &levels, &tiles, &keep,
                          &lateness, &lookback, &value_keep))
        return NULL;
    Layout *l = (Layout *)type->tp_alloc(type, 0);
    if (l == NULL)
        return NULL;
    double level[MAX_WINDOWS], length[MAX_WINDOWS];
    Py_ssize_t n_levels = numbers(widths, l->width, MAX_LEVELS, "widths");
    if (n_levels < 0 || numbers(keeps, l->keep_level, MAX_LEVELS, "keeps") != n_levels)
        goto bad;
    Py_ssize_t n_windows = numbers(levels, level, MAX_WINDOWS, "window_levels");
    if (n_windows < 0 || numbers(tiles, length, MAX_WINDOWS, "window_tiles") != n_windows)
        goto bad;
    for (int i = 0; i < n_levels; i++)
        if (!(l->width[i] >= 1) || !(l->keep_level[i] >= 0))
            goto bad;
    for (int w = 0; w < n_windows; w++) {
        /* Windows of at most 2**40 tiles keep index arithmetic far from overflow. */
        if (!(level[w] >= 0 && level[w] < n_levels && length[w] >= 1 && length[w] <= 0x1p40))
            goto bad;
        l->level[w] = (int)level[w];
        l->tiles[w] = (long long)length[w];
        l->read[l->level[w]][l->n_read[l->level[w]]++] = w;
    }
    l->n_levels = (int)n_levels;
    l->n_windows = (int)n_windows;
    l->keep = keep;
    l->lateness = lateness;
    l->lookback = lookback;
    l->value_keep = value_keep;
    return (PyObject *)l;
bad:
    if (!PyErr_Occurred())
        PyErr_SetString(PyExc_ValueError, "Layout: levels or windows out of range");
    Py_DECREF(l);
    return NULL;
}

static PyTypeObject LayoutType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "detector.state._tiles.Layout",
    .tp_basicsize = sizeof(Layout),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A tiled store's levels and windows, shared by its entities.",
    .tp_new = Layout_new,
};

/* --- Plan -------------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    int n_windows;
    int n_slots;
    int slot[N_SLOTS]; /* tracked attribute slots, ascending */
    PyObject *key[MAX_WINDOWS][N_VARS]; /* NULL where not wanted */
    PyObject *gap_key;
    Py_ssize_t n_keys; /* how many there are */
    /* Every key, in the order `build` puts them, each to None: a step's dict starts as its
     * copy (one allocation at the final size, no resizes) and has its values replaced. */
    PyObject *shape;
} Plan;

static PyTypeObject PlanType;

static void
Plan_dealloc(Plan *p)
{
    for (int w = 0; w < p->n_windows; w++)
        for (int v = 0; v < N_VARS; v++)
            Py_XDECREF(p->key[w][v]);
    Py_XDECREF(p->gap_key);
    Py_XDECREF(p->shape);
    Py_TYPE(p)->tp_free((PyObject *)p);
}

static PyObject *
Plan_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *slots, *keys, *gap_key;
    if (!PyArg_ParseTuple(args, "O!O!O:Plan", &PyTuple_Type, &slots, &PyTuple_Type, &keys,
                          &gap_key))
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(keys);
    if (n < 1 || n > MAX_WINDOWS || PyTuple_GET_SIZE(slots) > N_SLOTS) {
        PyErr_Format(PyExc_ValueError, "Plan: 1 to %d windows, at most 3 slots", MAX_WINDOWS);
        return NULL;
    }
    Plan *p = (Plan *)type->tp_alloc(type, 0);
    if (p == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(slots); i++) {
        long slot = PyLong_AsLong(PyTuple_GET_ITEM(slots, i));
        if (slot == -1 && PyErr_Occurred())
            goto fail;
        if (slot < 0 || slot >= N_SLOTS || (i && slot <= p->slot[i - 1])) {
            PyErr_SetString(PyExc_ValueError, "Plan: slots are ascending, each 0, 1 or 2");
            goto fail;
        }
        p->slot[i] = (int)slot;
        p->n_slots = (int)i + 1;
    }
    for (Py_ssize_t w = 0; w < n; w++) {
        PyObject *names = PyTuple_GET_ITEM(keys, w);
        if (!PyTuple_Check(names) || PyTuple_GET_SIZE(names) != N_VARS) {
            PyErr_SetString(PyExc_ValueError, "Plan: each window's keys: 10 names or None");
            goto fail;
        }
        p->n_windows = (int)w + 1;
        for (int v = 0; v < N_VARS; v++) {
            PyObject *name = PyTuple_GET_ITEM(names, v);
            if (name == Py_None)
                continue;
            if (!PyUnicode_CheckExact(name)) {
                PyErr_SetString(PyExc_TypeError, "Plan: a key is a str or None");
                goto fail;
            }
            Py_INCREF(name);
            p->key[w][v] = name;
            p->n_keys++;
        }
    }
    if (gap_key != Py_None) {
        if (!PyUnicode_CheckExact(gap_key)) {
            PyErr_SetString(PyExc_TypeError, "Plan: gap_key is a str or None");
            goto fail;
        }
        Py_INCREF(gap_key);
        p->gap_key = gap_key;
        p->n_keys++;
    }
    if ((p->shape = PyDict_New()) == NULL)
        goto fail;
    for (int w = 0; w < p->n_windows; w++)
        for (int v = 0; v < N_VARS; v++)
            if (p->key[w][v] && PyDict_SetItem(p->shape, p->key[w][v], Py_None) < 0)
                goto fail;
    if (p->gap_key && PyDict_SetItem(p->shape, p->gap_key, Py_None) < 0)
        goto fail;
    return (PyObject *)p;
fail:
    Py_DECREF(p);
    return NULL;
}

static PyTypeObject PlanType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "detector.state._tiles.Plan",
    .tp_basicsize = sizeof(Plan),
    .tp_dealloc = (destructor)Plan_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Which features of an entity kind to return, per window.",
    .tp_new = Plan_new,
};

/* --- hash tables of str keys ------------------------------------------------------------- */

/* Open addressing with linear probing and backward-shift deletion (no tombstones); every
 * row starts with its key (owned, NULL when the row is empty) and the low 32 bits of the
 * key's hash (tables stay under 2**31 rows), and 4 bytes the row may use. */
typedef struct {
    PyObject *key;
    uint32_t hash;
    int32_t label; /* IdRow's: -1 none, 0, 1 */
} Head;

/* A transaction the entity holds: `_Entity.ids`'s [timestamp, micros, label], 32 bytes. */
typedef struct {
    Head head;
    double ts;
    long long micros;
} IdRow;

/* An attribute value: its newest tile per level, then the newest timestamp that moved it
 * (`_Entity.values`). */
typedef struct {
    Head head;
    double ts;
    long long tile[MAX_LEVELS];
} ValueRow;

typedef struct {
    char *rows; /* NULL until the first insert */
    size_t size; /* a power of two, or 0 */
    size_t used;
} Table;

#define ROW(t, i, row_size) ((Head *)((t)->rows + (i) * (row_size)))

/* Whether two str are equal: PyUnicode_Compare's answer without its ordering, from the
 * canonical representation (same kind, length and code units). Both were hashed, hence are
 * ready. */
static inline int
str_equal(PyObject *a, PyObject *b)
{
    Py_ssize_t n = PyUnicode_GET_LENGTH(a);
    int kind = PyUnicode_KIND(a);
    return n == PyUnicode_GET_LENGTH(b) && kind == (int)PyUnicode_KIND(b) &&
           memcmp(PyUnicode_DATA(a), PyUnicode_DATA(b), (size_t)n * kind) == 0;
}

static inline int
same_key(Head *h, PyObject *key, Py_hash_t hash)
{
    return h->key == key || (h->hash == (uint32_t)hash && str_equal(h->key, key));
}

static void *
table_find(Table *t, size_t row_size, PyObject *key, Py_hash_t hash)
{
    if (t->rows == NULL)
        return NULL;
    size_t mask = t->size - 1;
    for (size_t i = (uint32_t)hash & mask;; i = (i + 1) & mask) {
        Head *h = ROW(t, i, row_size);
        if (h->key == NULL)
            return NULL;
        if (same_key(h, key, hash))
            return h;
    }
}

/* Move the rows into a table of `size` rows; -1 with MemoryError (the table unchanged). */
static int
table_resize(Table *t, size_t row_size, size_t size)
{
    char *rows = PyMem_Calloc(size, row_size);
    if (rows == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    size_t mask = size - 1;
    for (size_t i = 0; i < t->size; i++) {
        Head *h = ROW(t, i, row_size);
        if (h->key == NULL)
            continue;
        size_t j = (size_t)h->hash & mask;
        while (((Head *)(rows + j * row_size))->key != NULL)
            j = (j + 1) & mask;
        memcpy(rows + j * row_size, h, row_size);
    }
    PyMem_Free(t->rows);
    t->rows = rows;
    t->size = size;
    return 0;
}

/* Room for `extra` more rows at a load of at most 3/4. */
static int
table_reserve(Table *t, size_t row_size, size_t extra)
{
    size_t need = t->used + extra;
    if (need * 4 <= t->size * 3)
        return 0;
    size_t size = t->size ? t->size : 4;
    while (need * 4 > size * 3)
        size *= 2;
    if (size > ((size_t)1 << 31)) {
        PyErr_NoMemory();
        return -1;
    }
    return table_resize(t, row_size, size);
}

/* A new row for a key not in the table (room reserved): the key is referenced, the rest of
 * the row zeroed. */
static void *
table_insert(Table *t, size_t row_size, PyObject *key, Py_hash_t hash)
{
    size_t mask = t->size - 1;
    size_t i = (uint32_t)hash & mask;
    while (ROW(t, i, row_size)->key != NULL)
        i = (i + 1) & mask;
    Head *h = ROW(t, i, row_size);
    memset(h, 0, row_size);
    Py_INCREF(key);
    h->key = key;
    h->hash = (uint32_t)hash;
    t->used++;
    return h;
}

/* Remove a row, shifting back the rows of its probe run that may fill its place. */
static void
table_delete(Table *t, size_t row_size, void *row)
{
    size_t mask = t->size - 1;
    size_t i = (size_t)(((char *)row - t->rows) / row_size);
    PyObject *key = ((Head *)row)->key;
    for (size_t j = (i + 1) & mask;; j = (j + 1) & mask) {
        Head *h = ROW(t, j, row_size);
        if (h->key == NULL)
            break;
        size_t home = (size_t)h->hash & mask;
        /* The row at j may move to i when its home is not in the cyclic range (i, j]. */
        if ((j > i && (home <= i || home > j)) || (j < i && home <= i && home > j)) {
            memcpy(ROW(t, i, row_size), h, row_size);
            i = j;
        }
    }
    ROW(t, i, row_size)->key = NULL;
    t->used--;
    Py_DECREF(key);
}

/* Give back room after many deletions (a burst forgotten); keeps the table on failure. */
static void
table_trim(Table *t, size_t row_size)
{
    if (t->size > 16 && t->used * 8 < t->size) {
        size_t size = t->size;
        while (size > 16 && t->used * 8 < size)
            size /= 2;
        if (table_resize(t, row_size, size) < 0)
            PyErr_Clear();
    }
}

/* Make room for one more id: first let go of the ids no longer held (timestamp at or before
 * `cutoff`), then grow if that was not enough. After a purge the table is at most half full,
 * so the next one is a quarter of the table's inserts away. Where Python forgets an id when
 * its turn comes in the order of recording, this forgets it when room runs out: either way
 * an id no longer held is never held again (the entity's newest only grows), so no result
 * differs, and the ids cost no queue. -1 with MemoryError, nothing changed. */
static int
ids_reserve(Table *t, int purge, double cutoff)
{
    if ((t->used + 1) * 4 <= t->size * 3)
        return 0;
    size_t live = 0;
    for (size_t i = 0; purge && i < t->size; i++) {
        IdRow *row = (IdRow *)ROW(t, i, sizeof(IdRow));
        live += row->head.key != NULL && row->ts > cutoff;
    }
    if (!purge || live == t->used) /* nothing to let go */
        return table_reserve(t, sizeof(IdRow), 1);
    size_t size = 4;
    while ((live + 1) * 2 > size)
        size *= 2;
    char *rows = PyMem_Calloc(size, sizeof(IdRow));
    if (rows == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    char *old = t->rows;
    size_t old_size = t->size, mask = size - 1;
    for (size_t i = 0; i < old_size; i++) {
        IdRow *row = (IdRow *)(old + i * sizeof(IdRow));
        if (row->head.key == NULL || !(row->ts > cutoff))
            continue;
        size_t j = row->head.hash & mask;
        while (((Head *)(rows + j * sizeof(IdRow)))->key != NULL)
            j = (j + 1) & mask;
        memcpy(rows + j * sizeof(IdRow), row, sizeof(IdRow));
    }
    t->rows = rows;
    t->size = size;
    t->used = live;
    for (size_t i = 0; i < old_size; i++) { /* release the ids let go */
        IdRow *row = (IdRow *)(old + i * sizeof(IdRow));
        if (row->head.key != NULL && !(row->ts > cutoff))
            Py_DECREF(row->head.key);
    }
    PyMem_Free(old);
    return 0;
}

static void
table_clear(Table *t, size_t row_size)
{
    for (size_t i = 0; i < t->size; i++)
        Py_XDECREF(ROW(t, i, row_size)->key);
    PyMem_Free(t->rows);
    t->rows = NULL;
    t->size = t->used = 0;
}

/* --- queues ------------------------------------------------------------------------------ */

/* The order in which ids or values were recorded, to forget from the front: a ring buffer
 * of (timestamp, key) with the key owned. A value's key carries its slot in its low two bits
 * (objects are aligned to at least 8 bytes). */
typedef struct {
    double ts;
    PyObject *key;
} Stamp;

typedef struct {
    Stamp *items;
    size_t head, n, cap; /* cap a power of two, or 0 */
} Queue;

#define TAG_MASK ((uintptr_t)3)
#define UNTAG(p) ((PyObject *)((uintptr_t)(p) & ~TAG_MASK))

static int
queue_resize(Queue *q, size_t cap)
{
    Stamp *items = PyMem_Malloc(cap * sizeof(Stamp));
    if (items == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (size_t i = 0; i < q->n; i++)
        items[i] = q->items[(q->head + i) & (q->cap - 1)];
    PyMem_Free(q->items);
    q->items = items;
    q->head = 0;
    q->cap = cap;
    return 0;
}

static int
queue_reserve(Queue *q, size_t extra)
{
    if (q->n + extra <= q->cap)
        return 0;
    size_t cap = q->cap ? q->cap : 4;
    while (q->n + extra > cap)
        cap *= 2;
    return queue_resize(q, cap);
}

/* Append (room reserved); the key is referenced. */
static void
queue_push(Queue *q, double ts, PyObject *key, uintptr_t tag)
{
    Py_INCREF(key);
    Stamp *s = &q->items[(q->head + q->n) & (q->cap - 1)];
    s->ts = ts;
    s->key = (PyObject *)((uintptr_t)key | tag);
    q->n++;
}

static inline Stamp *
queue_front(Queue *q)
{
    return &q->items[q->head];
}

/* Drop the front; the caller releases its key. */
static void
queue_pop(Queue *q)
{
    q->head = (q->head + 1) & (q->cap - 1);
    q->n--;
}

static void
queue_trim(Queue *q)
{
    if (q->cap > 16 && q->n * 8 < q->cap) {
        size_t cap = q->cap;
        while (cap > 16 && q->n * 8 < cap)
            cap /= 2;
        if (queue_resize(q, cap) < 0)
            PyErr_Clear();
    }
}

static void
queue_clear(Queue *q)
{
    for (size_t i = 0; i < q->n; i++)
        Py_DECREF(UNTAG(q->items[(q->head + i) & (q->cap - 1)].key));
    PyMem_Free(q->items);
    q->items = NULL;
    q->head = q->n = q->cap = 0;
}

/* --- Entity ------------------------------------------------------------------------------ */

/* A tile: count, sum of micros, max amount, fraud count, and the number of terminals,
 * merchants and countries whose newest tile it is; 48 bytes. The fraud and distinct counts
 * are at most the count, and a step refuses (OverflowError) a transaction whose tile holds
 * `TILE_MAX` already: two billion transactions of one entity in one tile. */
typedef struct {
    wide sum;
    double max;
    int32_t count;
    int32_t fraud;
    int32_t distinct[N_SLOTS];
} Tile;

#define TILE_MAX INT32_MAX

/* A level's kept tiles: their indexes ascending, and the tiles in the same order. */
typedef struct {
    long long *index;
    Tile *tile;
    Py_ssize_t n, cap;
} Level;

/* A window's running sums for the tile it last ended at (`k`); `valid` 0 until the first
 * transaction or once its tiles were forgotten under it; `max_ok` 0 once its max left. */
typedef struct {
    wide sum;
    long long k;
    long long count;
    long long fraud;
    double max;
    long long distinct[N_SLOTS];
    char valid;
    char max_ok;
} Cache;

typedef struct {
    PyObject_HEAD
    Layout *layout;
    /* The id its map knows it by (NULL when made by the constructor): the label index
     * names entities with it, so that no transaction keeps its own copy of the id alive. */
    PyObject *ident;
    int has_newest;
    double newest;
    Level level[MAX_LEVELS];
    Cache *cache; /* one per window */
    /* The RING greatest (timestamp, transaction_id) recorded, ascending; ids owned (one
     * more place for an insert before the smallest leaves). */
    int ring_n;
    double ring_ts[RING + 1];
    PyObject *ring_id[RING + 1];
    Table ids;         /* of IdRow, including some no longer held (see `ids_reserve`) */
    Table values[N_SLOTS]; /* of ValueRow, one table per attribute */
    Queue recent_values;   /* (value's newest timestamp, value tagged with its slot) */
} Entity;

static PyTypeObject EntityType;

static void
empty_cache(Cache *c, long long k, int valid)
{
    memset(c, 0, sizeof(Cache));
    c->k = k;
    c->valid = (char)valid;
    c->max = -INFINITY;
    c->max_ok = 1;
}

static PyObject *
make_entity(PyTypeObject *type, Layout *layout, PyObject *ident)
{
    Entity *e = (Entity *)type->tp_alloc(type, 0);
    if (e == NULL)
        return NULL;
    Py_INCREF(layout);
    e->layout = layout;
    Py_XINCREF(ident);
    e->ident = ident;
    e->cache = PyMem_Malloc(layout->n_windows * sizeof(Cache));
    if (e->cache == NULL) {
        Py_DECREF(e);
        return PyErr_NoMemory();
    }
    for (int w = 0; w < layout->n_windows; w++)
        empty_cache(&e->cache[w], 0, 0);
    return (PyObject *)e;
}

static PyObject *
Entity_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    Layout *layout;
    if (!PyArg_ParseTuple(args, "O!:Entity", &LayoutType, &layout))
        return NULL;
    return make_entity(type, layout, NULL);
}

static void
Entity_dealloc(Entity *e)
{
    for (int i = 0; i < MAX_LEVELS; i++) {
        PyMem_Free(e->level[i].index);
        PyMem_Free(e->level[i].tile);
    }
    PyMem_Free(e->cache);
    for (int i = 0; i < e->ring_n; i++)
        Py_DECREF(e->ring_id[i]);
    table_clear(&e->ids, sizeof(IdRow));
    for (int s = 0; s < N_SLOTS; s++)
        table_clear(&e->values[s], sizeof(ValueRow));
    queue_clear(&e->recent_values);
    Py_XDECREF(e->layout);
    Py_XDECREF(e->ident);
    Py_TYPE(e)->tp_free((PyObject *)e);
}

/* --- tiles ------------------------------------------------------------------------------- */

/* Python's bisect over a level's indexes: the first position whose index is >= x (left) or
 * > x (right, below). */
static Py_ssize_t
bisect_left(const Level *v, long long x)
{
    Py_ssize_t lo = 0, hi = v->n;
    while (lo < hi) {
        Py_ssize_t mid = lo + (hi - lo) / 2;
        if (v->index[mid] < x)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

static Tile *
find_tile(Level *v, long long i)
{
    Py_ssize_t at = bisect_left(v, i);
    return at < v->n && v->index[at] == i ? &v->tile[at] : NULL;
}

/* bisect_right restricted to positions lo..hi, which hold the answer. */
static inline Py_ssize_t
bisect_right_in(const Level *v, long long x, Py_ssize_t lo, Py_ssize_t hi)
{
    while (lo < hi) {
        Py_ssize_t mid = lo + (hi - lo) / 2;
        if (x < v->index[mid])
            hi = mid;
        else
            lo = mid + 1;
    }
    return lo;
}

/* bisect_right of an answer at most `hi`, galloping back from there: O(log d) for an answer
 * d tiles before it. A transaction's own tile and the edge its windows last ended at are
 * nearly always the newest tiles or after them, and the old edges of a level's windows
 * (ascending lengths) each a few tiles before the previous one's, where a bisection over the
 * whole level would take its full log n steps. (bisect_left of x is bisect_right of x - 1:
 * indexes are integers.) */
static inline Py_ssize_t
bisect_right_before(const Level *v, long long x, Py_ssize_t hi)
{
    Py_ssize_t step = 1, lo;
    /* Every position from hi on holds an index > x. */
    for (;;) {
        lo = hi - step;
        if (lo <= 0) {
            lo = 0;
            break;
        }
        if (v->index[lo] <= x) {
            lo++;
            break;
        }
        hi = lo;
        step *= 2;
    }
    return bisect_right_in(v, x, lo, hi);
}

static inline Py_ssize_t
bisect_right_end(const Level *v, long long x)
{
    return bisect_right_before(v, x, v->n);
}

/* Room for one more transaction in tile i. */
static int
level_reserve(Level *v, long long i)
{
    Py_ssize_t at = bisect_right_end(v, i);
    Tile *t = at > 0 && v->index[at - 1] == i ? &v->tile[at - 1] : NULL;
    if (t != NULL && t->count >= TILE_MAX) {
        PyErr_SetString(PyExc_OverflowError, "step: a tile holds 2**31 - 1 transactions");
        return -1;
    }
    if (t != NULL || v->n < v->cap)
        return 0;
    /* Slow growth: the tiles of a level are most of an entity's memory. */
    Py_ssize_t cap = v->cap ? v->cap + v->cap / 4 + 4 : 4;
    long long *index = PyMem_Realloc(v->index, cap * sizeof(long long));
    if (index == NULL)
        goto nomem;
    v->index = index;
    Tile *tile = PyMem_Realloc(v->tile, cap * sizeof(Tile));
    if (tile == NULL)
        goto nomem;
    v->tile = tile;
    v->cap = cap;
    return 0;
nomem:
    PyErr_NoMemory();
    return -1;
}

/* Tile i, added empty in its place if it is not kept (room reserved). */
static Tile *
tile_at(Level *v, long long i)
{
    Py_ssize_t at = bisect_right_end(v, i);
    if (at > 0 && v->index[at - 1] == i)
        return &v->tile[at - 1];
    memmove(v->index + at + 1, v->index + at, (v->n - at) * sizeof(long long));
    memmove(v->tile + at + 1, v->tile + at, (v->n - at) * sizeof(Tile));
    v->n++;
    v->index[at] = i;
    Tile *t = &v->tile[at];
    memset(t, 0, sizeof(Tile));
    t->max = -INFINITY;
    return t;
}

/* Forget the tiles before index `horizon`, giving back room after a burst. */
static void
forget_tiles(Level *v, long long horizon)
{
    if (v->n == 0 || v->index[0] >= horizon) /* the usual case: nothing to forget */
        return;
    Py_ssize_t cut = bisect_left(v, horizon);
    if (!cut)
        return;
    v->n -= cut;
    memmove(v->index, v->index + cut, v->n * sizeof(long long));
    memmove(v->tile, v->tile + cut, v->n * sizeof(Tile));
    if (v->cap > 16 && v->n * 4 < v->cap) {
        Py_ssize_t cap = v->n * 2 + 4;
        /* A realloc that fails leaves its block as it was, larger: both arrays still hold
         * `cap` tiles once the first has shrunk to it. */
        long long *index = PyMem_Realloc(v->index, cap * sizeof(long long));
        if (index != NULL) {
            v->index = index;
            Tile *tile = PyMem_Realloc(v->tile, cap * sizeof(Tile));
            if (tile != NULL)
                v->tile = tile;
            v->cap = cap;
        }
    }
}

/* `_take` from position `at`, the first tile after its low edge: add (sign 1) or take out
 * (-1) the tiles up to `high` from a window's sums, the distinct sums too when `distinct`. A
 * max that leaves marks the window's max invalid. Returns the position after the last tile
 * taken (bisect_right of `high`): the tiles are walked anyway, so the end of the range costs
 * no search. */
static Py_ssize_t
take_from(Cache *c, const Level *v, Py_ssize_t at, long long high, int sign, int distinct)
{
    for (; at < v->n && v->index[at] <= high; at++) {
        const Tile *t = &v->tile[at];
        c->count += sign * t->count;
        c->sum += sign * t->sum;
        c->fraud += sign * t->fraud;
        if (sign > 0) {
            if (t->max > c->max)
                c->max = t->max;
        }
        else if (t->max >= c->max)
            c->max_ok = 0;
        if (distinct)
            for (int s = 0; s < N_SLOTS; s++)
                c->distinct[s] += sign * t->distinct[s];
    }
    return at;
}

/* The positions a level's windows share in a step: the transaction's tile k and, found once,
 * the tile the windows last ended at (they move together, so it is nearly always one for
 * all of them). The level does not change while they are used. */
typedef struct {
    long long k;
    Py_ssize_t at_k; /* bisect_right of k */
    long long last;  /* the last old edge asked for, and its bisect_right */
    Py_ssize_t at_last;
    int has_last;
    long long low;   /* the last low edge (k - n or c->k - n) asked for, and its bisect_right */
    Py_ssize_t at_low;
    int has_low;
} Edges;

static void
edges_init(Edges *g, const Level *v, long long k)
{
    g->k = k;
    g->at_k = bisect_right_end(v, k);
    g->has_last = g->has_low = 0;
}

/* bisect_right of a window's low edge, which is below k: galloping back from the previous
 * low edge's position when it is not above it, else from k's. */
static inline Py_ssize_t
low_at(Edges *g, const Level *v, long long x)
{
    Py_ssize_t at = bisect_right_before(v, x, g->has_low && x <= g->low ? g->at_low : g->at_k);
    g->low = x;
    g->at_low = at;
    g->has_low = 1;
    return at;
}

static inline Py_ssize_t
edge_at(Edges *g, const Level *v, long long x)
{
    if (!g->has_last || g->last != x) {
        g->last = x;
        g->at_last = bisect_right_end(v, x);
        g->has_last = 1;
    }
    return g->at_last;
}

/* Move a window of n tiles to end at the step's tile `g->k` (the loop body of `_step`). */
static void
move(Cache *c, const Level *v, Edges *g, long long n)
{
    long long k = g->k, d = k - c->k;
    Py_ssize_t first = -1; /* bisect_right of k - n, where the window's tiles begin */
    if (!c->valid || d >= n || -d >= n) {
        empty_cache(c, k, 1);
        take_from(c, v, low_at(g, v, k - n), k, 1, 1);
        for (Py_ssize_t at = g->at_k; at < v->n; at++)
            for (int s = 0; s < N_SLOTS; s++)
                c->distinct[s] += v->tile[at].distinct[s];
        return;
    }
    if (k > c->k) {
        first = take_from(c, v, low_at(g, v, c->k - n), k - n, -1, 1);
        take_from(c, v, edge_at(g, v, c->k), k, 1, 0);
    }
    else if (k < c->k) {
        take_from(c, v, g->at_k, c->k, -1, 0);
        first = low_at(g, v, k - n);
        take_from(c, v, first, c->k - n, 1, 1);
    }
    c->k = k;
    if (!c->max_ok) { /* the max left: find it again over the window's tiles */
        double high = -INFINITY;
        if (first < 0)
            first = low_at(g, v, k - n);
        for (Py_ssize_t at = first; at < g->at_k; at++)
            if (v->tile[at].max > high)
                high = v->tile[at].max;
        c->max = high;
        c->max_ok = 1;
    }
}

/* --- ids and ring ------------------------------------------------------------------------ */

/* Whether the entity still holds a row of its ids table (`_held`). */
static inline int
is_held(Entity *e, IdRow *row)
{
    return e->has_newest && row->ts > e->newest - e->layout->keep;
}

/* The row of a transaction the entity holds, or NULL. */
static IdRow *
held(Entity *e, PyObject *txid, Py_hash_t hash)
{
    IdRow *row = table_find(&e->ids, sizeof(IdRow), txid, hash);
    return row != NULL && is_held(e, row) ? row : NULL;
}

/* Whether ring entry i comes before (ts, txid) (or is equal, when `or_equal`), as Python
 * compares the tuples. */
static inline int
ring_before(Entity *e, int i, double ts, PyObject *txid, int or_equal)
{
    if (e->ring_ts[i] != ts)
        return e->ring_ts[i] < ts;
    int order = e->ring_id[i] == txid ? 0 : PyUnicode_Compare(e->ring_id[i], txid);
    return order < 0 || (or_equal && order == 0);
}

/* --- step -------------------------------------------------------------------------------- */

/* out[key] = value (a new reference, consumed); -1 on error. */
static int
put(PyObject *out, PyObject *key, PyObject *value)
{
    if (value == NULL)
        return -1;
    int failed = PyDict_SetItem(out, key, value);
    Py_DECREF(value);
    return failed;
}

/* The floats 0.0 to SMALL_FLOATS - 1, made once: most counts, fraud counts and distinct
 * counts are small, and a shared float saves an allocation per feature. */
#define SMALL_FLOATS 256
static PyObject *small_floats[SMALL_FLOATS];

static inline PyObject *
new_float(double value)
{
    if (value >= 0 && value < SMALL_FLOATS && !signbit(value)) {
        int i = (int)value;
        if ((double)i == value)
            return Py_NewRef(small_floats[i]);
    }
    return PyFloat_FromDouble(value);
}

static inline int
put_double(PyObject *out, PyObject *key, double value)
{
    return key == NULL ? 0 : put(out, key, new_float(value));
}

/* Take a key of the plan's shape out of a step's dict: a feature absent this time. */
static inline int
drop(PyObject *out, PyObject *key)
{
    return key == NULL ? 0 : PyDict_DelItem(out, key);
}

/* One window's raw aggregates, as `_step` hands them to `FeatureBuilder`. */
typedef struct {
    wide total;
    long long count, fraud;
    double max;
    long long distinct[N_SLOTS];
} Raw;

/* `FeatureBuilder.build` narrowed to the plan's keys, in its order: the plan's shape with its
 * values set, and the features absent this time (amount_ratio, seconds_since_last) taken
 * out, which leaves the others in their order. */
static PyObject *
build(Plan *p, double amount, const Raw *raws, int has_gap, double gap)
{
    PyObject *out = PyDict_Copy(p->shape);
    if (out == NULL)
        return NULL;
    for (int w = 0; w < p->n_windows; w++) {
        PyObject **keys = p->key[w];
        const Raw *r = &raws[w];
        if (r->count) {
            double amount_sum = int_div(r->total, 1000000);
            if (amount_sum == -1.0 && PyErr_Occurred())
                goto fail;
            double mean = amount_sum / (double)r->count;
            if (put_double(out, keys[V_COUNT], (double)r->count) < 0 ||
                put_double(out, keys[V_SUM], amount_sum) < 0 ||
                put_double(out, keys[V_MEAN], mean) < 0 ||
                put_double(out, keys[V_MAX], r->max) < 0)
                goto fail;
            if ((mean > 0 ? put_double(out, keys[V_RATIO], amount / mean)
                          : drop(out, keys[V_RATIO])) < 0)
                goto fail;
            if (put_double(out, keys[V_FRAUD], (double)r->fraud) < 0)
                goto fail;
            if (keys[V_SHARE]) {
                double share = int_div(r->fraud, r->count);
                if (share == -1.0 && PyErr_Occurred())
                    goto fail;
                if (put_double(out, keys[V_SHARE], share) < 0)
                    goto fail;
            }
        }
        else {
            static const int zeros[] = {V_COUNT, V_SUM, V_MEAN, V_MAX, V_FRAUD, V_SHARE};
            for (int z = 0; z < 6; z++)
                if (put_double(out, keys[zeros[z]], 0.0) < 0)
                    goto fail;
            if (drop(out, keys[V_RATIO]) < 0)
                goto fail;
        }
        for (int s = 0; s < N_SLOTS; s++)
            if (put_double(out, keys[V_DISTINCT + s], (double)r->distinct[s]) < 0)
                goto fail;
    }
    if ((has_gap ? put_double(out, p->gap_key, gap) : drop(out, p->gap_key)) < 0)
        goto fail;
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

/* `_record`: add a new transaction whose windows' sums are at its tiles, after forgetting
 * what the new newest lets go. Room for everything it adds is reserved: it cannot fail. */
static void
record(Entity *e, Plan *p, PyObject *txid, Py_hash_t txid_hash, int stale, double ts,
       long long micros, double amount, const long long *kk, PyObject *const *attrs,
       const Py_hash_t *hashes, double newest)
{
    Layout *l = e->layout;
    long long horizon[MAX_LEVELS];
    for (int i = 0; i < l->n_levels; i++) {
        horizon[i] = floor_ll((newest - l->keep_level[i]) / l->width[i]);
        forget_tiles(&e->level[i], horizon[i]);
    }
    for (int w = 0; w < l->n_windows; w++) {
        Cache *c = &e->cache[w];
        if (c->valid && c->k - l->tiles[w] + 1 < horizon[l->level[w]])
            c->valid = 0;
    }
    Tile *own[MAX_LEVELS]; /* the transaction's tile per level: no insert moves it below */
    for (int i = 0; i < l->n_levels; i++) {
        Tile *t = own[i] = tile_at(&e->level[i], kk[i]);
        t->count++;
        t->sum += micros;
        if (amount > t->max)
            t->max = amount;
    }
    for (int w = 0; w < l->n_windows; w++) {
        Cache *c = &e->cache[w];
        long long j = kk[l->level[w]];
        if (c->valid && c->k - l->tiles[w] < j && j <= c->k) {
            c->count++;
            c->sum += micros;
            if (amount > c->max)
                c->max = amount;
        }
    }
    /* A value counts in its newest tile per level: move its count there. */
    for (int a = 0; a < p->n_slots; a++) {
        int slot = p->slot[a];
        PyObject *value = attrs[slot];
        if (value == Py_None)
            continue;
        Table *table = &e->values[slot];
        ValueRow *rec = table_find(table, sizeof(ValueRow), value, hashes[slot]);
        int moved = 0;
        for (int i = 0; i < l->n_levels; i++) {
            long long j = kk[i];
            long long o = rec ? rec->tile[i] : 0;
            if (rec && j <= o)
                continue;
            moved = 1;
            Level *v = &e->level[i];
            own[i]->distinct[slot]++;
            Tile *old = NULL;
            if (rec && o >= horizon[i]) { /* o < j: among the tiles before j's */
                Py_ssize_t at = bisect_right_in(v, o, 0, own[i] - v->tile);
                if (at > 0 && v->index[at - 1] == o)
                    old = &v->tile[at - 1];
            }
            if (old)
                old->distinct[slot]--;
            for (int x = 0; x < l->n_read[i]; x++) {
                int w = l->read[i][x];
                Cache *c = &e->cache[w];
                if (c->valid) {
                    long long edge = c->k - l->tiles[w];
                    if (j > edge)
                        c->distinct[slot]++;
                    if (old && o > edge)
                        c->distinct[slot]--;
                }
            }
        }
        if (moved) {
            if (rec == NULL) {
                rec = table_insert(table, sizeof(ValueRow), value, hashes[slot]);
                for (int i = 0; i < l->n_levels; i++)
                    rec->tile[i] = kk[i];
                rec->ts = ts;
            }
            else {
                for (int i = 0; i < l->n_levels; i++)
                    if (kk[i] > rec->tile[i])
                        rec->tile[i] = kk[i];
                if (ts > rec->ts)
                    rec->ts = ts;
            }
            queue_push(&e->recent_values, rec->ts, rec->head.key, (uintptr_t)slot);
        }
    }
    double cutoff = newest - l->value_keep;
    Queue *q = &e->recent_values;
    while (q->n && queue_front(q)->ts <= cutoff) {
        Stamp stamp = *queue_front(q);
        queue_pop(q);
        PyObject *key = UNTAG(stamp.key);
        Table *table = &e->values[(uintptr_t)stamp.key & TAG_MASK];
        ValueRow *rec = table_find(table, sizeof(ValueRow), key, PyObject_Hash(key));
        if (rec != NULL && rec->ts == stamp.ts)
            table_delete(table, sizeof(ValueRow), rec);
        Py_DECREF(key);
    }
    queue_trim(q);
    for (int s = 0; s < N_SLOTS; s++)
        table_trim(&e->values[s], sizeof(ValueRow));

    /* insort into the ring, then keep its RING greatest */
    int at = e->ring_n;
    while (at > 0 && !ring_before(e, at - 1, ts, txid, 1))
        at--;
    memmove(e->ring_ts + at + 1, e->ring_ts + at, (e->ring_n - at) * sizeof(double));
    memmove(e->ring_id + at + 1, e->ring_id + at, (e->ring_n - at) * sizeof(PyObject *));
    e->ring_ts[at] = ts;
    Py_INCREF(txid);
    e->ring_id[at] = txid;
    if (++e->ring_n > RING) {
        Py_DECREF(e->ring_id[0]);
        e->ring_n--;
        memmove(e->ring_ts, e->ring_ts + 1, e->ring_n * sizeof(double));
        memmove(e->ring_id, e->ring_id + 1, e->ring_n * sizeof(PyObject *));
    }

    /* A row no longer held may still be in the table (`stale`), unless `ids_reserve` let go
     * of it: look for it only then. */
    IdRow *row = stale ? table_find(&e->ids, sizeof(IdRow), txid, txid_hash) : NULL;
    if (row == NULL)
        row = table_insert(&e->ids, sizeof(IdRow), txid, txid_hash);
    row->ts = ts;
    row->micros = micros;
    row->head.label = -1;
    e->newest = newest;
    e->has_newest = 1;
}

/* A str argument and its hash; -1 with an exception set. */
static int
str_hash(PyObject *s, const char *what, Py_hash_t *hash)
{
    if (!PyUnicode_Check(s)) {
        PyErr_Format(PyExc_TypeError, "step: %s must be a str, got %.80s", what,
                     Py_TYPE(s)->tp_name);
        return -1;
    }
    *hash = PyObject_Hash(s);
    return *hash == -1 ? -1 : 0;
}

/* The numbers of a transaction, checked once for all its entities. */
typedef struct {
    PyObject *txid;
    Py_hash_t txid_hash;
    double ts;
    long long micros;
    double amount;
    PyObject *attrs[N_SLOTS]; /* terminal, merchant, country: borrowed, Py_None when absent */
} Tx;

/* -1 with an exception set when the arguments cannot be held in C (before any change). */
static int
parse_tx(Tx *tx, PyObject *txid, PyObject *ts, PyObject *micros, PyObject *amount,
         PyObject *const *attrs)
{
    tx->txid = txid;
    if (str_hash(txid, "transaction_id", &tx->txid_hash) < 0)
        return -1;
    tx->ts = PyFloat_AsDouble(ts);
    if (tx->ts == -1.0 && PyErr_Occurred())
        return -1;
    if (!(fabs(tx->ts) <= MAX_TIME)) {
        /* What math.floor raises for NaN and infinities. */
        PyErr_SetString(isnan(tx->ts) ? PyExc_ValueError : PyExc_OverflowError,
                        "step: event time not finite or beyond the C tiles' range");
        return -1;
    }
    int overflow = 0;
    tx->micros = PyLong_AsLongLongAndOverflow(micros, &overflow);
    if (overflow) {
        PyErr_SetString(PyExc_OverflowError, "step: amount in micros beyond 64 bits");
        return -1;
    }
    if (tx->micros == -1 && PyErr_Occurred())
        return -1;
    tx->amount = PyFloat_AsDouble(amount);
    if (tx->amount == -1.0 && PyErr_Occurred())
        return -1;
    for (int s = 0; s < N_SLOTS; s++)
        tx->attrs[s] = attrs[s];
    return 0;
}

/* `_step` then `FeatureBuilder.build`: the features, and `*status`; NULL with an exception
 * set, nothing changed, on failure. */
static PyObject *
step(Entity *e, Plan *p, const Tx *tx, int *status_out)
{
    Layout *l = e->layout;
    if (p->n_windows != l->n_windows) {
        PyErr_SetString(PyExc_ValueError, "step: the plan has other windows");
        return NULL;
    }
    PyObject *txid = tx->txid;
    Py_hash_t txid_hash = tx->txid_hash, hashes[N_SLOTS] = {0, 0, 0};
    PyObject *const *attrs = tx->attrs;
    double ts = tx->ts, amount = tx->amount;
    long long micros = tx->micros;
    for (int a = 0; a < p->n_slots; a++) {
        int slot = p->slot[a];
        if (attrs[slot] != Py_None && str_hash(attrs[slot], "an attribute", &hashes[slot]) < 0)
            return NULL;
    }

    long long kk[MAX_LEVELS];
    for (int i = 0; i < l->n_levels; i++)
        kk[i] = floor_ll(ts / l->width[i]);
    int has_newest = e->has_newest;
    double newest = e->newest;
    int late = has_newest && ts < newest - l->lateness;
    IdRow *found = table_find(&e->ids, sizeof(IdRow), txid, txid_hash);
    IdRow *row = found && is_held(e, found) ? found : NULL;
    int status = row ? DUP : late ? LATE : NEW;
    if (row && row->ts != ts) {
        /* A redelivery is decided at the timestamp it was recorded with, whatever its own. */
        ts = row->ts;
        for (int i = 0; i < l->n_levels; i++)
            kk[i] = floor_ll(ts / l->width[i]);
    }
    double next_newest = newest;
    if (status == NEW && (!has_newest || ts > newest))
        next_newest = ts;

    if (status == NEW) { /* reserve room for everything `record` adds */
        for (int i = 0; i < l->n_levels; i++)
            if (level_reserve(&e->level[i], kk[i]) < 0)
                return NULL;
        if (ids_reserve(&e->ids, has_newest, newest - l->keep) < 0 ||
            queue_reserve(&e->recent_values, N_SLOTS) < 0)
            return NULL;
        for (int a = 0; a < p->n_slots; a++) {
            int slot = p->slot[a];
            if (attrs[slot] != Py_None &&
                table_reserve(&e->values[slot], sizeof(ValueRow), 1) < 0)
                return NULL;
        }
    }

    /* Move every window's sums to the transaction's tile (on copies unless it is new). */
    Cache copies[MAX_WINDOWS];
    Cache *caches = e->cache;
    if (status != NEW) {
        memcpy(copies, e->cache, l->n_windows * sizeof(Cache));
        caches = copies;
    }
    Raw raws[MAX_WINDOWS];
    Edges edges[MAX_LEVELS];
    for (int i = 0; i < l->n_levels; i++)
        edges_init(&edges[i], &e->level[i], kk[i]);
    for (int w = 0; w < l->n_windows; w++) {
        int i = l->level[w];
        Cache *c = &caches[w];
        move(c, &e->level[i], &edges[i], l->tiles[w]);
        Raw *r = &raws[w];
        r->count = c->count;
        r->total = c->sum;
        r->fraud = c->fraud;
        r->max = c->max;
        memcpy(r->distinct, c->distinct, sizeof(r->distinct));
        /* A redelivery's own amount is out of count, sum and fraud count. */
        if (row && (!has_newest || kk[i] >= floor_ll((newest - l->keep_level[i]) / l->width[i]))) {
            r->count -= 1;
            r->total -= row->micros;
            r->fraud -= row->head.label == 1;
        }
    }
    int pos = 0;
    while (pos < e->ring_n && ring_before(e, pos, ts, txid, 0))
        pos++;
    int has_gap = pos && e->ring_ts[pos - 1] > ts - l->lookback;
    double gap = has_gap ? ts - e->ring_ts[pos - 1] : 0.0;

    PyObject *out = build(p, amount, raws, has_gap, gap);
    if (out == NULL)
        return NULL;
    if (status == NEW)
        record(e, p, txid, txid_hash, found != NULL, ts, micros, amount, kk, attrs, hashes,
               next_newest);
    *status_out = status;
    return out;
}

static PyObject *
Entity_step(Entity *e, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 8 || !PyObject_TypeCheck(args[0], &PlanType)) {
        PyErr_SetString(PyExc_TypeError,
                        "step(plan, txid, ts, micros, amount, terminal, merchant, country)");
        return NULL;
    }
    Tx tx;
    int status;
    if (parse_tx(&tx, args[1], args[2], args[3], args[4], args + 5) < 0)
        return NULL;
    PyObject *out = step(e, (Plan *)args[0], &tx, &status);
    if (out == NULL)
        return NULL;
    return Py_BuildValue("(iN)", status, out);
}

/* --- labels and the rest ------------------------------------------------------------------ */

static PyObject *
Entity_label(Entity *e, PyObject *const *args, Py_ssize_t nargs)
{
    Py_hash_t hash;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "label(txid, label)");
        return NULL;
    }
    if (str_hash(args[0], "transaction_id", &hash) < 0)
        return NULL;
    long label = PyLong_AsLong(args[1]);
    if (label == -1 && PyErr_Occurred())
        return NULL;
    if (label != 0 && label != 1) {
        PyErr_SetString(PyExc_ValueError, "label: 0 or 1");
        return NULL;
    }
    IdRow *row = held(e, args[0], hash);
    if (row == NULL)
        Py_RETURN_NONE;
    int old = row->head.label;
    if (old == label)
        return Py_NewRef(s_duplicate);
    PyObject *outcome = old == -1 ? s_applied : s_changed;
    row->head.label = (int32_t)label;
    long long delta = label - (old == 1);
    if (delta) { /* `_move_fraud` */
        Layout *l = e->layout;
        for (int i = 0; i < l->n_levels; i++) {
            long long k = floor_ll(row->ts / l->width[i]);
            Tile *t = find_tile(&e->level[i], k);
            if (t == NULL) /* forgotten */
                continue;
            t->fraud += (int32_t)delta;
            for (int w = 0; w < l->n_windows; w++) {
                Cache *c = &e->cache[w];
                if (l->level[w] == i && c->valid && c->k - l->tiles[w] < k && k <= c->k)
                    c->fraud += delta;
            }
        }
    }
    return Py_NewRef(outcome);
}

static PyObject *
Entity_holds(Entity *e, PyObject *txid)
{
    Py_hash_t hash;
    if (str_hash(txid, "transaction_id", &hash) < 0)
        return NULL;
    return PyBool_FromLong(held(e, txid, hash) != NULL);
}

static PyObject *
Entity_get_newest(Entity *e, void *closure)
{
    if (!e->has_newest)
        Py_RETURN_NONE;
    return PyFloat_FromDouble(e->newest);
}

/* A cache as `_Entity.caches` holds it. */
static PyObject *
cache_list(const Cache *c)
{
    PyObject *sum = wide_to_long(c->sum);
    if (sum == NULL)
        return NULL;
    return Py_BuildValue("[LiLNLdiLLL]", c->k, (int)c->valid, c->count, sum, c->fraud, c->max,
                         (int)c->max_ok, c->distinct[0], c->distinct[1], c->distinct[2]);
}

/* append to a list, consuming the item; -1 on error */
static int
append(PyObject *list, PyObject *item)
{
    if (item == NULL)
        return -1;
    int failed = PyList_Append(list, item);
    Py_DECREF(item);
    return failed;
}

/* The pieces of a Python `_Entity` holding the same: (newest, tiles, order, caches, ring,
 * ids, recent_ids, values, recent_values), each as `_Entity` keeps it (deques as lists, and
 * values keyed by letter + value). */
static PyObject *
Entity_export(Entity *e, PyObject *unused)
{
    static const char letters[N_SLOTS] = {'t', 'm', 'c'};
    Layout *l = e->layout;
    PyObject *tiles = PyList_New(0), *order = PyList_New(0), *caches = PyList_New(0);
    PyObject *ring = PyList_New(0), *ids = PyDict_New(), *recent_ids = PyList_New(0);
    PyObject *values = PyDict_New(), *recent_values = PyList_New(0), *result = NULL;
    if (!tiles || !order || !caches || !ring || !ids || !recent_ids || !values || !recent_values)
        goto done;
    for (int i = 0; i < l->n_levels; i++) {
        Level *v = &e->level[i];
        PyObject *by_index = PyDict_New(), *indexes = PyList_New(0);
        if (append(tiles, by_index) < 0 || append(order, indexes) < 0)
            goto done;
        for (Py_ssize_t at = 0; at < v->n; at++) {
            Tile *t = &v->tile[at];
            PyObject *index = PyLong_FromLongLong(v->index[at]);
            PyObject *sum = wide_to_long(t->sum);
            PyObject *tile = sum ? Py_BuildValue("[iNdiiii]", (int)t->count, sum, t->max,
                                                 (int)t->fraud, (int)t->distinct[0],
                                                 (int)t->distinct[1], (int)t->distinct[2])
                                 : NULL;
            int failed = !index || !tile || PyDict_SetItem(by_index, index, tile) < 0 ||
                         PyList_Append(indexes, index) < 0;
            Py_XDECREF(index);
            Py_XDECREF(tile);
            if (failed)
                goto done;
        }
    }
    for (int w = 0; w < l->n_windows; w++)
        if (append(caches, cache_list(&e->cache[w])) < 0)
            goto done;
    for (int i = 0; i < e->ring_n; i++)
        if (append(ring, Py_BuildValue("(dO)", e->ring_ts[i], e->ring_id[i])) < 0)
            goto done;
    for (size_t i = 0; i < e->ids.size; i++) {
        IdRow *row = (IdRow *)ROW(&e->ids, i, sizeof(IdRow));
        if (row->head.key != NULL &&
            (put(ids, row->head.key,
                 Py_BuildValue("[dLi]", row->ts, row->micros, (int)row->head.label)) < 0 ||
             append(recent_ids, Py_BuildValue("(dO)", row->ts, row->head.key)) < 0))
            goto done;
    }
    if (PyList_Sort(recent_ids) < 0) /* the order Python forgets them in */
        goto done;
    for (int slot = 0; slot < N_SLOTS; slot++) {
        Table *table = &e->values[slot];
        for (size_t i = 0; i < table->size; i++) {
            ValueRow *rec = (ValueRow *)ROW(table, i, sizeof(ValueRow));
            if (rec->head.key == NULL)
                continue;
            PyObject *key = PyUnicode_FromFormat("%c%U", letters[slot], rec->head.key);
            PyObject *list = key ? PyList_New(0) : NULL;
            int failed = list == NULL;
            for (int j = 0; !failed && j < l->n_levels; j++)
                failed = append(list, PyLong_FromLongLong(rec->tile[j])) < 0;
            failed = failed || append(list, PyFloat_FromDouble(rec->ts)) < 0 ||
                     PyDict_SetItem(values, key, list) < 0;
            Py_XDECREF(key);
            Py_XDECREF(list);
            if (failed)
                goto done;
        }
    }
    for (size_t i = 0; i < e->recent_values.n; i++) {
        Queue *q = &e->recent_values;
        Stamp *s = &q->items[(q->head + i) & (q->cap - 1)];
        PyObject *key = PyUnicode_FromFormat("%c%U", letters[(uintptr_t)s->key & TAG_MASK],
                                             UNTAG(s->key));
        if (key == NULL || append(recent_values, Py_BuildValue("(dN)", s->ts, key)) < 0)
            goto done;
    }
    result = Py_BuildValue("(NOOOOOOOO)", Entity_get_newest(e, NULL), tiles, order, caches,
                           ring, ids, recent_ids, values, recent_values);
done:
    Py_XDECREF(tiles);
    Py_XDECREF(order);
    Py_XDECREF(caches);
    Py_XDECREF(ring);
    Py_XDECREF(ids);
    Py_XDECREF(recent_ids);
    Py_XDECREF(values);
    Py_XDECREF(recent_values);
    return result;
}

static PyObject *
Entity_sizeof(Entity *e, PyObject *unused)
{
    size_t size = Py_TYPE(e)->tp_basicsize + e->layout->n_windows * sizeof(Cache);
    for (int i = 0; i < MAX_LEVELS; i++)
        size += e->level[i].cap * (sizeof(long long) + sizeof(Tile));
    size += e->ids.size * sizeof(IdRow);
    for (int s = 0; s < N_SLOTS; s++)
        size += e->values[s].size * sizeof(ValueRow);
    size += e->recent_values.cap * sizeof(Stamp);
    return PyLong_FromSize_t(size);
}

static PyMethodDef Entity_methods[] = {
    {"step", (PyCFunction)(void (*)(void))Entity_step, METH_FASTCALL,
     "step(plan, txid, ts, micros, amount, terminal, merchant, country) -> (status, "
     "features): status 0 recorded, 1 held already, 2 too late."},
    {"label", (PyCFunction)(void (*)(void))Entity_label, METH_FASTCALL,
     "label(txid, label) -> 'applied', 'changed', 'duplicate', or None when not held."},
    {"holds", (PyCFunction)Entity_holds, METH_O, "holds(txid) -> whether the entity holds it."},
    {"export", (PyCFunction)Entity_export, METH_NOARGS,
     "export() -> (newest, tiles, order, caches, ring, ids, recent_ids, values, "
     "recent_values), as the Python entity keeps them."},
    {"__sizeof__", (PyCFunction)Entity_sizeof, METH_NOARGS, "Bytes held, arrays included."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Entity_getset[] = {
    {"newest", (getter)Entity_get_newest, NULL, "The newest recorded timestamp, or None.",
     NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject EntityType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "detector.state._tiles.Entity",
    .tp_basicsize = sizeof(Entity),
    .tp_dealloc = (destructor)Entity_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One entity's tiles, window sums, ring of recent transactions, ids and values.",
    .tp_methods = Entity_methods,
    .tp_getset = Entity_getset,
    .tp_new = Entity_new,
};

/* --- a whole transaction ---------------------------------------------------------------- */

#define N_KINDS 4
#define E_TXID 0 /* the fields of `Event` */
#define E_TS 1
#define E_AMOUNT 2
#define E_ENTITIES 3
#define E_ATTRS 5
#define EVENT_SIZE 8

/* observe(layout, kinds, maps, plans, event, micros) -> (features, entry, recorded, notes)
 *
 * `TiledMemoryStore._observe`'s loop over the entities an event names, in one call: per kind
 * (customer, card, terminal, merchant: `kinds` names them, `maps` holds each kind's id ->
 * Entity, created here as needed, and `plans` each kind's Plan) the step of its entity.
 * Returns the features per kind; the label index's entry (timestamp, then each kind's id or
 * None, the ids being the maps' own); whether any entity recorded the event; and None or a
 * list of (kind, status, newest - ts) for the entities that did not. */
static PyObject *
tiles_observe(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6 || !PyObject_TypeCheck(args[0], &LayoutType) || !PyTuple_Check(args[1]) ||
        PyTuple_GET_SIZE(args[1]) != N_KINDS || !PyTuple_Check(args[2]) ||
        PyTuple_GET_SIZE(args[2]) != N_KINDS || !PyTuple_Check(args[3]) ||
        PyTuple_GET_SIZE(args[3]) != N_KINDS || !PyTuple_Check(args[4]) ||
        PyTuple_GET_SIZE(args[4]) != EVENT_SIZE) {
        PyErr_SetString(PyExc_TypeError,
                        "observe(layout, kinds, maps, plans, event, micros): 4 kinds, maps and "
                        "plans, and an Event");
        return NULL;
    }
    Layout *layout = (Layout *)args[0];
    PyObject *kinds = args[1], *maps = args[2], *plans = args[3], *event = args[4];
    for (int i = 0; i < N_KINDS; i++)
        if (!PyDict_Check(PyTuple_GET_ITEM(maps, i)) ||
            !PyObject_TypeCheck(PyTuple_GET_ITEM(plans, i), &PlanType)) {
            PyErr_SetString(PyExc_TypeError, "observe: maps are dicts, plans Plans");
            return NULL;
        }
    Tx tx;
    if (parse_tx(&tx, PyTuple_GET_ITEM(event, E_TXID), PyTuple_GET_ITEM(event, E_TS), args[5],
                 PyTuple_GET_ITEM(event, E_AMOUNT), &PyTuple_GET_ITEM(event, E_ATTRS)) < 0)
        return NULL;
    PyObject *features = PyDict_New();
    PyObject *entry = features ? PyTuple_New(1 + N_KINDS) : NULL;
    int recorded = 0;
    PyObject *notes = NULL, *result = NULL;
    if (entry == NULL)
        goto done;
    Py_INCREF(PyTuple_GET_ITEM(event, E_TS));
    PyTuple_SET_ITEM(entry, 0, PyTuple_GET_ITEM(event, E_TS));
    for (int i = 0; i < N_KINDS; i++) {
        Py_INCREF(Py_None);
        PyTuple_SET_ITEM(entry, 1 + i, Py_None);
    }
    for (int i = 0; i < N_KINDS; i++) {
        PyObject *ident = PyTuple_GET_ITEM(event, E_ENTITIES + i);
        if (ident == Py_None)
            continue;
        PyObject *kind = PyTuple_GET_ITEM(kinds, i), *map = PyTuple_GET_ITEM(maps, i);
        PyObject *entity = PyDict_GetItemWithError(map, ident); /* borrowed */
        if (entity == NULL) {
            if (PyErr_Occurred() || (entity = make_entity(&EntityType, layout, ident)) == NULL)
                goto done;
            int failed = PyDict_SetItem(map, ident, entity);
            Py_DECREF(entity); /* the map holds it */
            if (failed)
                goto done;
        }
        else if (!PyObject_TypeCheck(entity, &EntityType)) {
            PyErr_SetString(PyExc_TypeError, "observe: a map holds something else");
            goto done;
        }
        Entity *e = (Entity *)entity;
        if (e->layout != layout) {
            PyErr_SetString(PyExc_ValueError, "observe: an entity of another layout");
            goto done;
        }
        int status;
        PyObject *out = step(e, (Plan *)PyTuple_GET_ITEM(plans, i), &tx, &status);
        if (put(features, kind, out) < 0)
            goto done;
        PyObject *own = e->ident ? e->ident : ident;
        Py_INCREF(own);
        Py_SETREF(PyTuple_GET_ITEM(entry, 1 + i), own);
        if (status == NEW) {
            recorded = 1;
            continue;
        }
        if (notes == NULL && (notes = PyList_New(0)) == NULL)
            goto done;
        if (append(notes, Py_BuildValue("(Oid)", kind, status, e->newest - tx.ts)) < 0)
            goto done;
    }
    if ((result = PyTuple_New(4)) == NULL)
        goto done;
    PyTuple_SET_ITEM(result, 0, features);
    PyTuple_SET_ITEM(result, 1, entry);
    PyTuple_SET_ITEM(result, 2, Py_NewRef(recorded ? Py_True : Py_False));
    PyTuple_SET_ITEM(result, 3, Py_NewRef(notes ? notes : Py_None));
    features = entry = NULL;
done:
    Py_XDECREF(features);
    Py_XDECREF(entry);
    Py_XDECREF(notes);
    return result;
}

static PyMethodDef tiles_methods[] = {
    {"observe", (PyCFunction)(void (*)(void))tiles_observe, METH_FASTCALL,
     "observe(layout, kinds, maps, plans, event, micros) -> (features, entry, recorded, "
     "notes): every entity's step of an event."},
    {NULL, NULL, 0, NULL},
};

/* --- module ------------------------------------------------------------------------------ */

static struct PyModuleDef tiles_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "detector.state._tiles",
    .m_doc = "The tiled memory store's entities in C (optional; detector.state.memory_tiled "
             "falls back to Python).",
    .m_size = -1,
    .m_methods = tiles_methods,
};

static int
add_type(PyObject *module, const char *name, PyTypeObject *type)
{
    Py_INCREF(type);
    if (PyModule_AddObject(module, name, (PyObject *)type) < 0) {
        Py_DECREF(type);
        return -1;
    }
    return 0;
}

PyMODINIT_FUNC
PyInit__tiles(void)
{
    if (PyType_Ready(&LayoutType) < 0 || PyType_Ready(&PlanType) < 0 ||
        PyType_Ready(&EntityType) < 0)
        return NULL;
    for (int i = 0; i < SMALL_FLOATS; i++)
        if (small_floats[i] == NULL && (small_floats[i] = PyFloat_FromDouble(i)) == NULL)
            return NULL;
    if (s_applied == NULL) {
        s_applied = PyUnicode_InternFromString("applied");
        s_changed = PyUnicode_InternFromString("changed");
        s_duplicate = PyUnicode_InternFromString("duplicate");
        if (!s_applied || !s_changed || !s_duplicate)
            return NULL;
    }
    PyObject *module = PyModule_Create(&tiles_module);
    if (module == NULL)
        return NULL;
    if (PyModule_AddIntConstant(module, "MAX_WINDOWS", MAX_WINDOWS) < 0 ||
        PyModule_AddIntConstant(module, "MAX_LEVELS", MAX_LEVELS) < 0 ||
        PyModule_AddIntConstant(module, "RING", RING) < 0 ||
        PyModule_AddObject(module, "MAX_TIME", PyFloat_FromDouble(MAX_TIME)) < 0 ||
        add_type(module, "Layout", &LayoutType) < 0 || add_type(module, "Plan", &PlanType) < 0 ||
        add_type(module, "Entity", &EntityType) < 0)
        goto fail;
    return module;
fail:
    Py_DECREF(module);
    return NULL;
}
