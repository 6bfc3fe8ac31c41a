/* One entity's history for the memory store, in C (optional: `make native`).
 *
 * The same data and operations as `detector.state._History`, whose docstring explains them,
 * but held in contiguous arrays (event times, amounts, prefix sums, peaks, last-occurrence
 * positions) rather than in lists of Python objects: at handbook scale a transaction's
 * features read thirty days of three entities' histories, and in lists every probe of a
 * bisect is a cache miss on a float object allocated days of event time apart.
 *
 * History(attrs)
 *   `attrs` are the record indexes of the attributes whose distinct values are tracked.
 *   Methods position, scan, gap, insert, rebuild, trim, add_fraud, records and the properties
 *   attrs, base, oldest and newest behave as `_History`'s (the store's property tests run
 *   against both). A record is the store's tuple (ts, transaction_id, amount, micros,
 *   terminal, merchant, country); its event time must be finite and its micros must fit in
 *   64 bits (ValueError, OverflowError otherwise, before anything changes: the store goes
 *   back to Python for such amounts). Everything a call could fail on is checked before it
 *   changes anything; should one still fail midway (out of memory), the history empties
 *   itself rather than keep indexes that disagree with its records.
 *
 * Plan(windows, keys, gap_key)
 *   One entity kind's features for one set of wanted names: `windows` longest first, and for
 *   each a tuple of the feature names wanted of it (None where not wanted) in the order
 *   count, sum, mean, max, amount_ratio, fraud_count, fraud_share, then one distinct count
 *   per tracked attribute; `gap_key` names seconds_since_last, or None.
 *   Plan.step(history, record, lookback, keep, longest) is the code `_compile_features`
 *   generates: the features over the history, then the record appended, or None (and
 *   nothing changed) when the record does not come after everything in the history. The
 *   same dict, key order included, with the same floats: sums are exact integers of
 *   micros, divided as Python divides ints.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <string.h>

#define MAX_ATTRS 3
#define MAX_WINDOWS 16
#define RECORD_SIZE 7
#define R_TS 0
#define R_TXID 1
#define R_AMOUNT 2
#define R_MICROS 3
/* The variables of a window, in the order of `Plan`'s keys. */
enum { V_COUNT, V_SUM, V_MEAN, V_MAX, V_RATIO, V_FRAUD, V_SHARE, V_DISTINCT };
#define MAX_VARS (V_DISTINCT + MAX_ATTRS)

typedef __int128 wide;

typedef struct {
    PyObject_HEAD
    Py_ssize_t n;   /* records held */
    Py_ssize_t cap; /* room in ts, amount, txs (sums and frauds: cap + 1) */
    long long base; /* absolute position of index 0 */
    double *ts;
    double *amount;
    PyObject **txs; /* owned record tuples */
    wide *sums;     /* prefix sums of micros, n + 1 */
    long long *frauds;
    long long *peaks; /* absolute positions of suffix maxima of the amount */
    Py_ssize_t n_peaks, cap_peaks;
    int n_attrs;
    int attr[MAX_ATTRS];
    PyObject *last[MAX_ATTRS]; /* dict: value -> absolute position of its last occurrence */
    long long *lasts[MAX_ATTRS]; /* those positions, sorted */
    Py_ssize_t n_lasts[MAX_ATTRS], cap_lasts[MAX_ATTRS];
} History;

static PyTypeObject HistoryType;

/* --- arrays ------------------------------------------------------------------------------ */

static int
reserve(History *h, Py_ssize_t need)
{
    if (need <= h->cap)
        return 0;
    Py_ssize_t cap = h->cap ? h->cap : 4;
    while (cap < need)
        cap += cap / 2 + 4;
    double *ts = PyMem_Realloc(h->ts, cap * sizeof(double));
    if (ts == NULL)
        goto nomem;
    h->ts = ts;
    double *amount = PyMem_Realloc(h->amount, cap * sizeof(double));
    if (amount == NULL)
        goto nomem;
    h->amount = amount;
    PyObject **txs = PyMem_Realloc(h->txs, cap * sizeof(PyObject *));
    if (txs == NULL)
        goto nomem;
    h->txs = txs;
    wide *sums = PyMem_Realloc(h->sums, (cap + 1) * sizeof(wide));
    if (sums == NULL)
        goto nomem;
    h->sums = sums;
    long long *frauds = PyMem_Realloc(h->frauds, (cap + 1) * sizeof(long long));
    if (frauds == NULL)
        goto nomem;
    h->frauds = frauds;
    h->cap = cap;
    return 0;
nomem:
    PyErr_NoMemory();
    return -1;
}

/* Give back room beyond `cap` (at least n + 1) after a burst was trimmed; keeps the old
 * arrays where the allocator cannot. */
static void
shrink(History *h, Py_ssize_t cap)
{
    if (cap < h->n + 1)
        cap = h->n + 1;
    if (cap < 4)
        cap = 4;
    double *ts = PyMem_Realloc(h->ts, cap * sizeof(double));
    double *amount = ts ? PyMem_Realloc(h->amount, cap * sizeof(double)) : NULL;
    PyObject **txs = amount ? PyMem_Realloc(h->txs, cap * sizeof(PyObject *)) : NULL;
    wide *sums = txs ? PyMem_Realloc(h->sums, (cap + 1) * sizeof(wide)) : NULL;
    long long *frauds = sums ? PyMem_Realloc(h->frauds, (cap + 1) * sizeof(long long)) : NULL;
    /* A realloc that fails leaves its block as it was, larger: every array still holds at
     * least `cap` once the first has shrunk to it. */
    if (ts) {
        h->ts = ts;
        h->cap = cap;
    }
    if (amount)
        h->amount = amount;
    if (txs)
        h->txs = txs;
    if (sums)
        h->sums = sums;
    if (frauds)
        h->frauds = frauds;
}

/* Room for one more item in a growing array of long longs. */
static int
room(long long **items, Py_ssize_t n, Py_ssize_t *cap)
{
    if (n < *cap)
        return 0;
    Py_ssize_t grown = *cap ? *cap + *cap / 2 + 4 : 4;
    long long *more = PyMem_Realloc(*items, grown * sizeof(long long));
    if (more == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    *items = more;
    *cap = grown;
    return 0;
}

/* Python's bisect on sorted C arrays: the first index in [lo, hi) whose item is >= x (left)
 * or > x (right); `after` says whether x goes after a[mid]. */
#define BISECT(name, type, after)                                                             \
    static Py_ssize_t name(const type *a, Py_ssize_t lo, Py_ssize_t hi, type x)              \
    {                                                                                         \
        while (lo < hi) {                                                                     \
            Py_ssize_t mid = lo + (hi - lo) / 2;                                              \
            if (after)                                                                        \
                lo = mid + 1;                                                                 \
            else                                                                              \
                hi = mid;                                                                     \
        }                                                                                     \
        return lo;                                                                            \
    }

BISECT(bisect_right_d, double, !(x < a[mid]))
BISECT(bisect_left_d, double, a[mid] < x)
BISECT(bisect_left_ll, long long, a[mid] < x)

/* --- records ----------------------------------------------------------------------------- */

/* The parts of a record the arrays hold; -1 with an exception set if it is not one. */
static int
parse_record(PyObject *tx, double *ts, double *amount, long long *micros)
{
    if (!PyTuple_CheckExact(tx) || PyTuple_GET_SIZE(tx) != RECORD_SIZE) {
        PyErr_SetString(PyExc_TypeError, "History: a record is a tuple of 7 items");
        return -1;
    }
    *ts = PyFloat_AsDouble(PyTuple_GET_ITEM(tx, R_TS));
    if (*ts == -1.0 && PyErr_Occurred())
        return -1;
    if (!isfinite(*ts)) {
        PyErr_SetString(PyExc_ValueError, "History: an event time must be finite");
        return -1;
    }
    *amount = PyFloat_AsDouble(PyTuple_GET_ITEM(tx, R_AMOUNT));
    if (*amount == -1.0 && PyErr_Occurred())
        return -1;
    int overflow = 0;
    *micros = PyLong_AsLongLongAndOverflow(PyTuple_GET_ITEM(tx, R_MICROS), &overflow);
    if (overflow) {
        PyErr_SetString(PyExc_OverflowError, "History: amount in micros beyond 64 bits");
        return -1;
    }
    if (*micros == -1 && PyErr_Occurred())
        return -1;
    return 0;
}

static inline PyObject *
txid_of(History *h, Py_ssize_t i)
{
    return PyTuple_GET_ITEM(h->txs[i], R_TXID);
}

/* -1 with an exception set when a tracked attribute of the record cannot key a dict. */
static int
check_attrs(const int *attr, int n_attrs, PyObject *tx)
{
    for (int a = 0; a < n_attrs; a++) {
        PyObject *value = PyTuple_GET_ITEM(tx, attr[a]);
        if (value != Py_None && PyObject_Hash(value) == -1)
            return -1;
    }
    return 0;
}

/* An exact integer as a Python int. */
static PyObject *
wide_to_long(wide v)
{
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

/* v / 1_000_000 as Python divides ints: exactly when both are at most 2**53, else correctly
 * rounded (through Python ints). -1.0 with an exception set on failure. */
static double
micros_to_amount(wide v)
{
    const wide limit = (wide)1 << 53;
    if (-limit <= v && v <= limit)
        return (double)(long long)v / 1e6;
    PyObject *numerator = wide_to_long(v);
    if (numerator == NULL)
        return -1.0;
    PyObject *million = PyLong_FromLong(1000000);
    PyObject *quotient = million ? PyNumber_TrueDivide(numerator, million) : NULL;
    Py_DECREF(numerator);
    Py_XDECREF(million);
    if (quotient == NULL)
        return -1.0;
    double result = PyFloat_AsDouble(quotient);
    Py_DECREF(quotient);
    return result;
}

/* --- History ----------------------------------------------------------------------------- */

static void
clear_attrs(History *h)
{
    for (int a = 0; a < h->n_attrs; a++) {
        Py_CLEAR(h->last[a]);
        PyMem_Free(h->lasts[a]);
        h->lasts[a] = NULL;
        h->n_lasts[a] = h->cap_lasts[a] = 0;
    }
    h->n_attrs = 0;
}

/* Track the attributes at these record indexes (empty indexes: `rebuild` fills them). */
static int
set_attrs(History *h, PyObject *attrs)
{
    if (!PyTuple_Check(attrs) || PyTuple_GET_SIZE(attrs) > MAX_ATTRS) {
        PyErr_SetString(PyExc_TypeError, "History: attrs is a tuple of at most 3 indexes");
        return -1;
    }
    int indexes[MAX_ATTRS];
    Py_ssize_t count = PyTuple_GET_SIZE(attrs);
    for (Py_ssize_t a = 0; a < count; a++) {
        long index = PyLong_AsLong(PyTuple_GET_ITEM(attrs, a));
        if (index == -1 && PyErr_Occurred())
            return -1;
        if (index <= R_MICROS || index >= RECORD_SIZE) {
            PyErr_Format(PyExc_ValueError, "History: attribute index %ld is not 4, 5 or 6", index);
            return -1;
        }
        indexes[a] = (int)index;
    }
    clear_attrs(h);
    for (Py_ssize_t a = 0; a < count; a++) {
        if ((h->last[a] = PyDict_New()) == NULL) {
            h->n_attrs = (int)a;
            clear_attrs(h);
            return -1;
        }
        h->attr[a] = indexes[a];
    }
    h->n_attrs = (int)count;
    return 0;
}

/* Forget every record and index: a consistent empty history, after a failure midway (only
 * running out of memory gets there). The exception stays set. */
static void
reset(History *h)
{
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    for (Py_ssize_t i = 0; i < h->n; i++)
        Py_DECREF(h->txs[i]);
    h->base += h->n;
    h->n = 0;
    h->sums[0] = 0;
    h->frauds[0] = 0;
    h->n_peaks = 0;
    for (int a = 0; a < h->n_attrs; a++) {
        PyDict_Clear(h->last[a]);
        h->n_lasts[a] = 0;
    }
    PyErr_Restore(type, value, traceback);
}

static PyObject *
History_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *attrs;
    if (!PyArg_ParseTuple(args, "O:History", &attrs))
        return NULL;
    History *h = (History *)type->tp_alloc(type, 0);
    if (h == NULL)
        return NULL;
    if (set_attrs(h, attrs) < 0 || reserve(h, 4) < 0) {
        Py_DECREF(h);
        return NULL;
    }
    h->sums[0] = 0;
    h->frauds[0] = 0;
    return (PyObject *)h;
}

static void
History_dealloc(History *h)
{
    for (Py_ssize_t i = 0; i < h->n; i++)
        Py_DECREF(h->txs[i]);
    clear_attrs(h);
    PyMem_Free(h->ts);
    PyMem_Free(h->amount);
    PyMem_Free(h->txs);
    PyMem_Free(h->sums);
    PyMem_Free(h->frauds);
    PyMem_Free(h->peaks);
    Py_TYPE(h)->tp_free((PyObject *)h);
}

static Py_ssize_t
History_len(History *h)
{
    return h->n;
}

/* List index where a transaction with this key goes (after every smaller key). */
static Py_ssize_t
position(History *h, double ts, PyObject *txid)
{
    Py_ssize_t index = bisect_left_d(h->ts, 0, h->n, ts);
    while (index < h->n && h->ts[index] == ts) {
        int less = PyObject_RichCompareBool(txid_of(h, index), txid, Py_LT);
        if (less < 0)
            return -1;
        if (!less)
            break;
        index++;
    }
    return index;
}

static PyObject *
History_position(History *h, PyObject *args)
{
    double ts;
    PyObject *txid;
    if (!PyArg_ParseTuple(args, "dO:position", &ts, &txid))
        return NULL;
    Py_ssize_t index = position(h, ts, txid);
    return index < 0 ? NULL : PyLong_FromSsize_t(index);
}

/* Whether labels (a dict) marks this transaction fraudulent; -1 on error. */
static int
labelled_fraud(PyObject *labels, PyObject *txid)
{
    PyObject *label = PyDict_GetItemWithError(labels, txid);
    if (label == NULL)
        return PyErr_Occurred() ? -1 : 0;
    return PyObject_IsTrue(label);
}

static PyObject *
History_scan(History *h, PyObject *args)
{
    Py_ssize_t index;
    double ts;
    PyObject *txid, *windows, *labels;
    if (!PyArg_ParseTuple(args, "ndOOO!:scan", &index, &ts, &txid, &windows, &PyDict_Type,
                          &labels))
        return NULL;
    if (index < 0 || index > h->n) {
        PyErr_SetString(PyExc_IndexError, "scan: index out of range");
        return NULL;
    }
    PyObject *fast = PySequence_Fast(windows, "scan: windows must be a sequence");
    if (fast == NULL)
        return NULL;
    PyObject *raws = PyList_New(0);
    PyObject *seen[3] = {NULL, NULL, NULL};
    PyObject *total = NULL;
    if (raws == NULL)
        goto fail;
    for (Py_ssize_t w = 0; w < PySequence_Fast_GET_SIZE(fast); w++) {
        double window = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(fast, w));
        if (window == -1.0 && PyErr_Occurred())
            goto fail;
        Py_ssize_t start = bisect_right_d(h->ts, 0, index, ts - window);
        long long count = 0, fraud = 0;
        PyObject *high = NULL; /* borrowed amount, NULL for 0.0 */
        double highest = 0.0;
        if ((total = PyLong_FromLong(0)) == NULL)
            goto fail;
        for (int a = 0; a < 3; a++)
            if ((seen[a] = PySet_New(NULL)) == NULL)
                goto fail;
        for (Py_ssize_t i = start; i < index; i++) {
            PyObject *tx = h->txs[i];
            int same = PyObject_RichCompareBool(PyTuple_GET_ITEM(tx, R_TXID), txid, Py_EQ);
            if (same < 0)
                goto fail;
            if (same)
                continue;
            count++;
            PyObject *sum = PyNumber_Add(total, PyTuple_GET_ITEM(tx, R_MICROS));
            if (sum == NULL)
                goto fail;
            Py_SETREF(total, sum);
            int is_fraud = labelled_fraud(labels, PyTuple_GET_ITEM(tx, R_TXID));
            if (is_fraud < 0)
                goto fail;
            fraud += is_fraud;
            if (h->amount[i] > highest) {
                highest = h->amount[i];
                high = PyTuple_GET_ITEM(tx, R_AMOUNT);
            }
            for (int a = 0; a < 3; a++)
                if (PySet_Add(seen[a], PyTuple_GET_ITEM(tx, R_MICROS + 1 + a)) < 0)
                    goto fail;
        }
        Py_ssize_t distinct[3];
        for (int a = 0; a < 3; a++) {
            int has_none = PySet_Contains(seen[a], Py_None);
            if (has_none < 0)
                goto fail;
            distinct[a] = PySet_GET_SIZE(seen[a]) - has_none;
            Py_CLEAR(seen[a]);
        }
        PyObject *raw = high != NULL
                            ? Py_BuildValue("(LOOLnnn)", count, total, high, fraud, distinct[0],
                                            distinct[1], distinct[2])
                            : Py_BuildValue("(LOdLnnn)", count, total, 0.0, fraud, distinct[0],
                                            distinct[1], distinct[2]);
        Py_CLEAR(total);
        if (raw == NULL)
            goto fail;
        int appended = PyList_Append(raws, raw);
        Py_DECREF(raw);
        if (appended < 0)
            goto fail;
    }
    Py_DECREF(fast);
    return raws;
fail:
    for (int a = 0; a < 3; a++)
        Py_XDECREF(seen[a]);
    Py_XDECREF(total);
    Py_XDECREF(raws);
    Py_DECREF(fast);
    return NULL;
}

static PyObject *
History_gap(History *h, PyObject *args)
{
    Py_ssize_t index;
    double ts, lookback;
    PyObject *txid;
    if (!PyArg_ParseTuple(args, "ndOd:gap", &index, &ts, &txid, &lookback))
        return NULL;
    if (index < 0 || index > h->n) {
        PyErr_SetString(PyExc_IndexError, "gap: index out of range");
        return NULL;
    }
    Py_ssize_t i = index - 1;
    while (i >= 0) {
        int same = PyObject_RichCompareBool(txid_of(h, i), txid, Py_EQ);
        if (same < 0)
            return NULL;
        if (!same)
            break;
        i--;
    }
    if (i < 0 || h->ts[i] <= ts - lookback)
        Py_RETURN_NONE;
    return PyFloat_FromDouble(ts - h->ts[i]);
}

static PyObject *
History_insert(History *h, PyObject *args)
{
    Py_ssize_t index;
    PyObject *tx;
    double ts, amount;
    long long micros;
    if (!PyArg_ParseTuple(args, "nO:insert", &index, &tx))
        return NULL;
    if (parse_record(tx, &ts, &amount, &micros) < 0 ||
        check_attrs(h->attr, h->n_attrs, tx) < 0 || reserve(h, h->n + 1) < 0)
        return NULL;
    if (index < 0)
        index = 0;
    if (index > h->n)
        index = h->n;
    Py_ssize_t after = h->n - index;
    memmove(h->ts + index + 1, h->ts + index, after * sizeof(double));
    memmove(h->amount + index + 1, h->amount + index, after * sizeof(double));
    memmove(h->txs + index + 1, h->txs + index, after * sizeof(PyObject *));
    h->ts[index] = ts;
    h->amount[index] = amount;
    Py_INCREF(tx);
    h->txs[index] = tx;
    h->n++;
    Py_RETURN_NONE;
}

static int
compare_ll(const void *a, const void *b)
{
    long long x = *(const long long *)a, y = *(const long long *)b;
    return (x > y) - (x < y);
}

/* Recompute every index from the records (after an out-of-order insert or a change of the
 * tracked attributes, which emptied the indexes: so a record they cannot index empties the
 * history too, rather than leave it with indexes that miss records). */
static int
rebuild(History *h, PyObject *labels)
{
    for (Py_ssize_t i = 0; i < h->n; i++) {
        double ts, amount;
        long long micros;
        if (parse_record(h->txs[i], &ts, &amount, &micros) < 0 ||
            check_attrs(h->attr, h->n_attrs, h->txs[i]) < 0 ||
            labelled_fraud(labels, txid_of(h, i)) < 0)
            goto fail;
    }
    long long base = h->base;
    h->sums[0] = 0;
    h->frauds[0] = 0;
    h->n_peaks = 0;
    for (int a = 0; a < h->n_attrs; a++) {
        PyDict_Clear(h->last[a]);
        h->n_lasts[a] = 0;
    }
    for (Py_ssize_t i = 0; i < h->n; i++) {
        PyObject *tx = h->txs[i];
        double ts, amount;
        long long micros;
        if (parse_record(tx, &ts, &amount, &micros) < 0)
            goto fail;
        h->sums[i + 1] = h->sums[i] + micros;
        int is_fraud = labelled_fraud(labels, PyTuple_GET_ITEM(tx, R_TXID));
        if (is_fraud < 0)
            goto fail;
        h->frauds[i + 1] = h->frauds[i] + is_fraud;
        while (h->n_peaks && h->amount[h->peaks[h->n_peaks - 1] - base] <= amount)
            h->n_peaks--;
        if (room(&h->peaks, h->n_peaks, &h->cap_peaks) < 0)
            goto fail;
        h->peaks[h->n_peaks++] = i + base;
        for (int a = 0; a < h->n_attrs; a++) {
            PyObject *value = PyTuple_GET_ITEM(tx, h->attr[a]);
            if (value == Py_None)
                continue;
            PyObject *at = PyLong_FromLongLong(i + base);
            if (at == NULL)
                goto fail;
            int failed = PyDict_SetItem(h->last[a], value, at);
            Py_DECREF(at);
            if (failed < 0)
                goto fail;
        }
    }
    for (int a = 0; a < h->n_attrs; a++) {
        Py_ssize_t pos = 0, count = 0;
        PyObject *key, *value;
        while (PyDict_Next(h->last[a], &pos, &key, &value)) {
            if (room(&h->lasts[a], count, &h->cap_lasts[a]) < 0)
                goto fail;
            h->lasts[a][count++] = PyLong_AsLongLong(value);
        }
        if (count)
            qsort(h->lasts[a], count, sizeof(long long), compare_ll);
        h->n_lasts[a] = count;
    }
    return 0;
fail:
    reset(h);
    return -1;
}

static PyObject *
History_rebuild(History *h, PyObject *labels)
{
    if (!PyDict_Check(labels)) {
        PyErr_SetString(PyExc_TypeError, "rebuild: labels must be a dict");
        return NULL;
    }
    if (rebuild(h, labels) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* Forget transactions with timestamp <= cutoff. */
static int
trim(History *h, double cutoff)
{
    Py_ssize_t drop = bisect_right_d(h->ts, 0, h->n, cutoff);
    if (!drop)
        return 0;
    long long base = h->base, floor = base + drop;
    for (int a = 0; a < h->n_attrs; a++) {
        Py_ssize_t gone = bisect_left_ll(h->lasts[a], 0, h->n_lasts[a], floor);
        for (Py_ssize_t j = 0; j < gone; j++) {
            PyObject *value = PyTuple_GET_ITEM(h->txs[h->lasts[a][j] - base], h->attr[a]);
            if (PyDict_DelItem(h->last[a], value) < 0) {
                reset(h);
                return -1;
            }
        }
        if (gone) {
            h->n_lasts[a] -= gone;
            memmove(h->lasts[a], h->lasts[a] + gone, h->n_lasts[a] * sizeof(long long));
        }
    }
    for (Py_ssize_t i = 0; i < drop; i++)
        Py_DECREF(h->txs[i]);
    Py_ssize_t keep = h->n - drop;
    memmove(h->ts, h->ts + drop, keep * sizeof(double));
    memmove(h->amount, h->amount + drop, keep * sizeof(double));
    memmove(h->txs, h->txs + drop, keep * sizeof(PyObject *));
    memmove(h->sums, h->sums + drop, (keep + 1) * sizeof(wide));
    memmove(h->frauds, h->frauds + drop, (keep + 1) * sizeof(long long));
    h->n = keep;
    h->base = floor;
    Py_ssize_t old = bisect_left_ll(h->peaks, 0, h->n_peaks, floor);
    h->n_peaks -= old;
    memmove(h->peaks, h->peaks + old, h->n_peaks * sizeof(long long));
    if (h->cap > 64 && keep < h->cap / 4)
        shrink(h, keep * 2);
    return 0;
}

static PyObject *
History_trim(History *h, PyObject *arg)
{
    double cutoff = PyFloat_AsDouble(arg);
    if (cutoff == -1.0 && PyErr_Occurred())
        return NULL;
    if (trim(h, cutoff) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
History_add_fraud(History *h, PyObject *args)
{
    double ts;
    PyObject *txid;
    long long delta;
    if (!PyArg_ParseTuple(args, "dOL:add_fraud", &ts, &txid, &delta))
        return NULL;
    Py_ssize_t index = position(h, ts, txid);
    if (index < 0)
        return NULL;
    if (index < h->n) {
        int same = PyObject_RichCompareBool(txid_of(h, index), txid, Py_EQ);
        if (same < 0)
            return NULL;
        if (same)
            for (Py_ssize_t j = index + 1; j <= h->n; j++)
                h->frauds[j] += delta;
    }
    Py_RETURN_NONE;
}

static PyObject *
History_records(History *h, PyObject *unused)
{
    PyObject *list = PyList_New(h->n);
    if (list == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < h->n; i++) {
        Py_INCREF(h->txs[i]);
        PyList_SET_ITEM(list, i, h->txs[i]);
    }
    return list;
}

static PyObject *
History_get_attrs(History *h, void *closure)
{
    PyObject *attrs = PyTuple_New(h->n_attrs);
    if (attrs == NULL)
        return NULL;
    for (int a = 0; a < h->n_attrs; a++) {
        PyObject *index = PyLong_FromLong(h->attr[a]);
        if (index == NULL) {
            Py_DECREF(attrs);
            return NULL;
        }
        PyTuple_SET_ITEM(attrs, a, index);
    }
    return attrs;
}

static int
History_set_attrs(History *h, PyObject *value, void *closure)
{
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "attrs cannot be deleted");
        return -1;
    }
    return set_attrs(h, value);
}

static PyObject *
History_get_base(History *h, void *closure)
{
    return PyLong_FromLongLong(h->base);
}

static PyObject *
History_get_oldest(History *h, void *closure)
{
    if (!h->n) {
        PyErr_SetString(PyExc_IndexError, "empty history");
        return NULL;
    }
    return PyFloat_FromDouble(h->ts[0]);
}

static PyObject *
History_get_newest(History *h, void *closure)
{
    if (!h->n) {
        PyErr_SetString(PyExc_IndexError, "empty history");
        return NULL;
    }
    return PyFloat_FromDouble(h->ts[h->n - 1]);
}

static PyMethodDef History_methods[] = {
    {"position", (PyCFunction)History_position, METH_VARARGS,
     "position(ts, txid) -> index where a transaction with this key goes."},
    {"scan", (PyCFunction)History_scan, METH_VARARGS,
     "scan(index, ts, txid, windows, labels) -> raw aggregates before index, by brute force."},
    {"gap", (PyCFunction)History_gap, METH_VARARGS,
     "gap(index, ts, txid, lookback) -> seconds since the latest before index, or None."},
    {"insert", (PyCFunction)History_insert, METH_VARARGS,
     "insert(index, record): put a record at index (rebuild must follow)."},
    {"rebuild", (PyCFunction)History_rebuild, METH_O, "rebuild(labels): recompute the indexes."},
    {"trim", (PyCFunction)History_trim, METH_O, "trim(cutoff): forget records at or before it."},
    {"add_fraud", (PyCFunction)History_add_fraud, METH_VARARGS,
     "add_fraud(ts, txid, delta): add delta to the fraud count of a held transaction."},
    {"records", (PyCFunction)History_records, METH_NOARGS, "records() -> the records, in order."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef History_getset[] = {
    {"attrs", (getter)History_get_attrs, (setter)History_set_attrs,
     "Record indexes of the tracked attributes (setting one empties the indexes).", NULL},
    {"base", (getter)History_get_base, NULL, "Transactions dropped from the front.", NULL},
    {"oldest", (getter)History_get_oldest, NULL, "Event time of the oldest record.", NULL},
    {"newest", (getter)History_get_newest, NULL, "Event time of the newest record.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PySequenceMethods History_as_sequence = {
    .sq_length = (lenfunc)History_len,
};

static PyTypeObject HistoryType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "detector.state._history.History",
    .tp_basicsize = sizeof(History),
    .tp_dealloc = (destructor)History_dealloc,
    .tp_as_sequence = &History_as_sequence,
    /* Holds only records (tuples of strings and numbers) and dicts of them: no cycles. */
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One entity's recorded transactions and their indexes, in C arrays.",
    .tp_methods = History_methods,
    .tp_getset = History_getset,
    .tp_new = History_new,
};

/* --- Plan -------------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    int n_windows;
    int n_vars; /* V_DISTINCT + the tracked attributes */
    double window[MAX_WINDOWS];
    int computed[MAX_WINDOWS]; /* some feature of the window is wanted */
    PyObject *key[MAX_WINDOWS][MAX_VARS]; /* NULL where not wanted */
    PyObject *gap_key;
} Plan;

static void
Plan_dealloc(Plan *p)
{
    for (int k = 0; k < p->n_windows; k++)
        for (int v = 0; v < MAX_VARS; v++)
            Py_XDECREF(p->key[k][v]);
    Py_XDECREF(p->gap_key);
    Py_TYPE(p)->tp_free((PyObject *)p);
}

static PyObject *
Plan_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *windows, *keys, *gap_key;
    if (!PyArg_ParseTuple(args, "O!O!O:Plan", &PyTuple_Type, &windows, &PyTuple_Type, &keys,
                          &gap_key))
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(windows);
    if (n < 1 || n > MAX_WINDOWS || PyTuple_GET_SIZE(keys) != n) {
        PyErr_Format(PyExc_ValueError, "Plan: 1 to %d windows, with keys for each",
                     MAX_WINDOWS);
        return NULL;
    }
    Plan *p = (Plan *)type->tp_alloc(type, 0);
    if (p == NULL)
        return NULL;
    p->n_windows = (int)n;
    p->n_vars = -1;
    for (Py_ssize_t k = 0; k < n; k++) {
        p->window[k] = PyFloat_AsDouble(PyTuple_GET_ITEM(windows, k));
        if (p->window[k] == -1.0 && PyErr_Occurred())
            goto fail;
        if (k && !(p->window[k] < p->window[k - 1])) {
            PyErr_SetString(PyExc_ValueError, "Plan: windows must be longest first");
            goto fail;
        }
        PyObject *names = PyTuple_GET_ITEM(keys, k);
        if (!PyTuple_Check(names) || PyTuple_GET_SIZE(names) < V_DISTINCT ||
            PyTuple_GET_SIZE(names) > MAX_VARS ||
            (p->n_vars >= 0 && PyTuple_GET_SIZE(names) != p->n_vars)) {
            PyErr_SetString(PyExc_ValueError, "Plan: each window's keys: 7 to 10 names or None");
            goto fail;
        }
        p->n_vars = (int)PyTuple_GET_SIZE(names);
        for (int v = 0; v < p->n_vars; v++) {
            PyObject *name = PyTuple_GET_ITEM(names, v);
            if (name == Py_None)
                continue;
            if (!PyUnicode_CheckExact(name)) {
                PyErr_SetString(PyExc_TypeError, "Plan: a key is a str or None");
                goto fail;
            }
            Py_INCREF(name);
            p->key[k][v] = name;
            p->computed[k] = 1;
        }
    }
    if (gap_key != Py_None) {
        if (!PyUnicode_CheckExact(gap_key)) {
            PyErr_SetString(PyExc_TypeError, "Plan: gap_key is a str or None");
            goto fail;
        }
        Py_INCREF(gap_key);
        p->gap_key = gap_key;
    }
    return (PyObject *)p;
fail:
    Py_DECREF(p);
    return NULL;
}

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

static PyObject *
Plan_step(Plan *p, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5 || !PyObject_TypeCheck(args[0], &HistoryType)) {
        PyErr_SetString(PyExc_TypeError, "step(history, record, lookback, keep, longest)");
        return NULL;
    }
    History *h = (History *)args[0];
    PyObject *tx = args[1];
    double ts, amount;
    long long micros;
    if (parse_record(tx, &ts, &amount, &micros) < 0 || check_attrs(h->attr, h->n_attrs, tx) < 0)
        return NULL;
    double lookback = PyFloat_AsDouble(args[2]);
    double keep = PyFloat_AsDouble(args[3]);
    double longest = PyFloat_AsDouble(args[4]);
    if (PyErr_Occurred())
        return NULL;
    if (h->n_attrs + V_DISTINCT != p->n_vars) {
        PyErr_SetString(PyExc_ValueError, "step: the plan tracks other attributes");
        return NULL;
    }
    Py_ssize_t n = h->n;
    PyObject *txid = PyTuple_GET_ITEM(tx, R_TXID);
    if (n) {
        /* Not after everything held: the caller inserts it (the slow path). */
        if (ts < h->ts[n - 1])
            Py_RETURN_NONE;
        if (ts == h->ts[n - 1]) {
            int after = PyObject_RichCompareBool(txid, txid_of(h, n - 1), Py_GT);
            if (after < 0)
                return NULL;
            if (!after)
                Py_RETURN_NONE;
        }
    }
    if (reserve(h, n + 1) < 0 || room(&h->peaks, h->n_peaks, &h->cap_peaks) < 0)
        return NULL;
    for (int a = 0; a < h->n_attrs; a++)
        if (room(&h->lasts[a], h->n_lasts[a], &h->cap_lasts[a]) < 0)
            return NULL;

    /* Features, as the generated code computes them. */
    const long long base = h->base;
    const wide sa = h->sums[n];
    const long long fa = h->frauds[n];
    int done = 0; /* windows 0 .. done - 1 are not empty */
    long long count[MAX_WINDOWS];
    double sum[MAX_WINDOWS], mean[MAX_WINDOWS];
    long long fraud[MAX_WINDOWS];
    PyObject *high[MAX_WINDOWS];
    double distinct[MAX_WINDOWS][MAX_ATTRS];
    int has_gap = 0;
    double gap = 0.0;
    if (n) {
        double last = h->ts[n - 1];
        if (last > ts - lookback) {
            has_gap = 1;
            gap = ts - last;
        }
        Py_ssize_t lo = 0, pi = 0;
        done = p->n_windows;
        for (int k = 0; k < p->n_windows; k++) {
            if (!p->computed[k])
                continue;
            PyObject **keys = p->key[k];
            lo = bisect_right_d(h->ts, lo, n, ts - p->window[k]);
            count[k] = n - lo;
            if (!count[k]) {
                done = k;
                break;
            }
            long long la = lo + base;
            if (keys[V_MAX]) {
                while (h->peaks[pi] < la)
                    pi++;
                high[k] = PyTuple_GET_ITEM(h->txs[h->peaks[pi] - base], R_AMOUNT);
            }
            if (keys[V_SUM] || keys[V_MEAN] || keys[V_RATIO]) {
                sum[k] = micros_to_amount(sa - h->sums[lo]);
                if (sum[k] == -1.0 && PyErr_Occurred())
                    return NULL;
                mean[k] = sum[k] / (double)count[k];
            }
            fraud[k] = fa - h->frauds[lo];
            for (int a = 0; a < h->n_attrs; a++) {
                Py_ssize_t size = h->n_lasts[a];
                distinct[k][a] =
                    size ? (double)(size - bisect_left_ll(h->lasts[a], 0, size, la)) : 0.0;
            }
        }
    }
    PyObject *out = PyDict_New();
    if (out == NULL)
        return NULL;
    for (int k = 0; k < p->n_windows; k++) {
        PyObject **keys = p->key[k];
        int filled = k < done;
        for (int v = 0; v < p->n_vars; v++) {
            if (v == V_RATIO || keys[v] == NULL)
                continue;
            double value = 0.0;
            if (filled) {
                switch (v) {
                case V_COUNT:
                    value = (double)count[k];
                    break;
                case V_SUM:
                    value = sum[k];
                    break;
                case V_MEAN:
                    value = mean[k];
                    break;
                case V_MAX:
                    if (PyDict_SetItem(out, keys[v], high[k]) < 0)
                        goto fail;
                    continue;
                case V_FRAUD:
                    value = (double)fraud[k];
                    break;
                case V_SHARE:
                    value = (double)fraud[k] / (double)count[k];
                    break;
                default:
                    value = distinct[k][v - V_DISTINCT];
                }
            }
            if (put(out, keys[v], PyFloat_FromDouble(value)) < 0)
                goto fail;
        }
    }
    for (int k = 0; k < done; k++)
        if (p->key[k][V_RATIO] && mean[k] > 0 &&
            put(out, p->key[k][V_RATIO], PyFloat_FromDouble(amount / mean[k])) < 0)
            goto fail;
    if (p->gap_key && has_gap && put(out, p->gap_key, PyFloat_FromDouble(gap)) < 0)
        goto fail;

    /* Record: the transaction comes after everything in the history. */
    long long end = base + n;
    for (int a = 0; a < h->n_attrs; a++) {
        PyObject *value = PyTuple_GET_ITEM(tx, h->attr[a]);
        if (value == Py_None)
            continue;
        PyObject *old = PyDict_GetItemWithError(h->last[a], value);
        if (old != NULL) {
            long long at = PyLong_AsLongLong(old);
            long long *positions = h->lasts[a];
            Py_ssize_t i = bisect_left_ll(positions, 0, h->n_lasts[a], at);
            memmove(positions + i, positions + i + 1, (h->n_lasts[a] - i - 1) * sizeof(long long));
            h->n_lasts[a]--;
        }
        else if (PyErr_Occurred())
            goto broken;
        if (put(h->last[a], value, PyLong_FromLongLong(end)) < 0)
            goto broken;
        h->lasts[a][h->n_lasts[a]++] = end;
    }
    while (h->n_peaks && h->amount[h->peaks[h->n_peaks - 1] - base] <= amount)
        h->n_peaks--;
    h->peaks[h->n_peaks++] = end;
    h->ts[n] = ts;
    h->amount[n] = amount;
    Py_INCREF(tx);
    h->txs[n] = tx;
    h->sums[n + 1] = sa + micros;
    h->frauds[n + 1] = fa;
    h->n = ++n;
    double cutoff = ts - keep;
    if (h->ts[0] <= cutoff && (n >= 64 || h->ts[n / 2] <= cutoff) && trim(h, cutoff) < 0)
        goto fail; /* trim emptied the history */
    if (h->n_peaks > 8) {
        /* Peaks older than the longest window are never read again. */
        long long floor = h->base + bisect_right_d(h->ts, 0, h->n, ts - longest);
        if (h->peaks[0] < floor) {
            Py_ssize_t old = bisect_left_ll(h->peaks, 0, h->n_peaks, floor);
            h->n_peaks -= old;
            memmove(h->peaks, h->peaks + old, h->n_peaks * sizeof(long long));
        }
    }
    return out;
broken:
    reset(h);
fail:
    Py_DECREF(out);
    return NULL;
}

static PyMethodDef Plan_methods[] = {
    {"step", (PyCFunction)(void (*)(void))Plan_step, METH_FASTCALL,
     "step(history, record, lookback, keep, longest) -> features, then record; None when "
     "the record does not come after the history."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject PlanType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "detector.state._history.Plan",
    .tp_basicsize = sizeof(Plan),
    .tp_dealloc = (destructor)Plan_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Which features of an entity kind to compute, per window.",
    .tp_methods = Plan_methods,
    .tp_new = Plan_new,
};

static struct PyModuleDef history_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "detector.state._history",
    .m_doc = "The memory store's entity histories in C (optional; detector.state falls back "
             "to Python).",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__history(void)
{
    if (PyType_Ready(&HistoryType) < 0 || PyType_Ready(&PlanType) < 0)
        return NULL;
    PyObject *module = PyModule_Create(&history_module);
    if (module == NULL)
        return NULL;
    if (PyModule_AddIntConstant(module, "MAX_WINDOWS", MAX_WINDOWS) < 0)
        goto fail;
    Py_INCREF(&HistoryType);
    if (PyModule_AddObject(module, "History", (PyObject *)&HistoryType) < 0) {
        Py_DECREF(&HistoryType);
        goto fail;
    }
    Py_INCREF(&PlanType);
    if (PyModule_AddObject(module, "Plan", (PyObject *)&PlanType) < 0) {
        Py_DECREF(&PlanType);
        goto fail;
    }
    return module;
fail:
    Py_DECREF(module);
    return NULL;
}
