/* The tree model's walk in C: the same comparisons and float additions as the Python code
 * that `detector.model.TreeModel` generates, in the same order, so both give the same bits.
 *
 * Forest(n_features, feature, threshold, left, right, roots, add_start, add_feature,
 *        add_credit)
 *   Nodes of every tree in flat arrays: `feature[i]` is the input a split compares (-1 at a
 *   leaf), `left`/`right` index the same arrays, `roots` holds each tree's first node. Leaf i
 *   adds `add_credit[k]` to the credit of input `add_feature[k]` for k in
 *   add_start[i] .. add_start[i + 1] - 1, in that order.
 *
 * Forest.walk(values, k) -> (credits, top)
 *   `values` is a tuple of numbers, one per input, each taken as float() takes it. Walks every tree: at a split,
 *   left when `value <= threshold` (so NaN goes right), then adds the leaf's credits.
 *   `credits` is the tuple of each input's summed credit; `top` the indexes of the `k`
 *   largest credits by absolute value, largest first, the lower index first among equals
 *   (as Python's stable `sorted(..., reverse=True)`), zeros left out.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <limits.h>
#include <math.h>

typedef struct {
    PyObject_HEAD
    Py_ssize_t n_features;
    Py_ssize_t n_nodes;
    Py_ssize_t n_trees;
    int *feature;
    double *threshold;
    int *left;
    int *right;
    int *roots;
    Py_ssize_t *add_start; /* n_nodes + 1 */
    int *add_feature;
    double *add_credit;
} Forest;

static void
Forest_dealloc(Forest *self)
{
    PyMem_Free(self->feature);
    PyMem_Free(self->threshold);
    PyMem_Free(self->left);
    PyMem_Free(self->right);
    PyMem_Free(self->roots);
    PyMem_Free(self->add_start);
    PyMem_Free(self->add_feature);
    PyMem_Free(self->add_credit);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* A new C array of `*size` ints from a sequence; NULL with an exception set on failure. */
static int *
int_array(PyObject *seq, const char *name, Py_ssize_t *size)
{
    PyObject *fast = PySequence_Fast(seq, name);
    if (fast == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    int *out = PyMem_Malloc((n ? n : 1) * sizeof(int));
    if (out == NULL) {
        Py_DECREF(fast);
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        long v = PyLong_AsLong(PySequence_Fast_GET_ITEM(fast, i));
        if ((v == -1 && PyErr_Occurred()) || v < INT_MIN || v > INT_MAX) {
            if (!PyErr_Occurred())
                PyErr_Format(PyExc_OverflowError, "Forest: %s holds %ld, out of range", name, v);
            PyMem_Free(out);
            Py_DECREF(fast);
            return NULL;
        }
        out[i] = (int)v;
    }
    Py_DECREF(fast);
    *size = n;
    return out;
}

static double *
double_array(PyObject *seq, const char *name, Py_ssize_t *size)
{
    PyObject *fast = PySequence_Fast(seq, name);
    if (fast == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    double *out = PyMem_Malloc((n ? n : 1) * sizeof(double));
    if (out == NULL) {
        Py_DECREF(fast);
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        double v = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(fast, i));
        if (v == -1.0 && PyErr_Occurred()) {
            PyMem_Free(out);
            Py_DECREF(fast);
            return NULL;
        }
        out[i] = v;
    }
    Py_DECREF(fast);
    *size = n;
    return out;
}

static PyObject *
Forest_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    Py_ssize_t n_features;
    PyObject *feature, *threshold, *left, *right, *roots, *add_start, *add_feature, *add_credit;
    if (!PyArg_ParseTuple(args, "nOOOOOOOO:Forest", &n_features, &feature, &threshold, &left,
                          &right, &roots, &add_start, &add_feature, &add_credit))
        return NULL;
    Forest *self = (Forest *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->n_features = n_features;
    Py_ssize_t n_threshold, n_left, n_right, n_starts, n_adds, n_credits;
    int *starts = NULL;
    if ((self->feature = int_array(feature, "feature", &self->n_nodes)) == NULL ||
        (self->threshold = double_array(threshold, "threshold", &n_threshold)) == NULL ||
        (self->left = int_array(left, "left", &n_left)) == NULL ||
        (self->right = int_array(right, "right", &n_right)) == NULL ||
        (self->roots = int_array(roots, "roots", &self->n_trees)) == NULL ||
        (starts = int_array(add_start, "add_start", &n_starts)) == NULL ||
        (self->add_feature = int_array(add_feature, "add_feature", &n_adds)) == NULL ||
        (self->add_credit = double_array(add_credit, "add_credit", &n_credits)) == NULL)
        goto fail;
    Py_ssize_t n = self->n_nodes;
    if (n_threshold != n || n_left != n || n_right != n || n_starts != n + 1 ||
        n_credits != n_adds) {
        PyErr_SetString(PyExc_ValueError, "Forest: array lengths disagree");
        goto fail;
    }
    self->add_start = PyMem_Malloc((n + 1) * sizeof(Py_ssize_t));
    if (self->add_start == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    /* Check every index once here, so that `credits` needs no bounds checks. */
    for (Py_ssize_t i = 0; i <= n; i++) {
        if (starts[i] < 0 || starts[i] > n_adds || (i && starts[i] < starts[i - 1])) {
            PyErr_SetString(PyExc_ValueError, "Forest: add_start out of order or range");
            goto fail;
        }
        self->add_start[i] = starts[i];
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        int f = self->feature[i];
        if (f >= n_features ||
            (f >= 0 && (self->left[i] <= i || self->left[i] >= n || self->right[i] <= i ||
                        self->right[i] >= n))) {
            PyErr_SetString(PyExc_ValueError, "Forest: a split's input or child is out of range");
            goto fail;
        }
    }
    for (Py_ssize_t k = 0; k < n_adds; k++) {
        if (self->add_feature[k] < 0 || self->add_feature[k] >= n_features) {
            PyErr_SetString(PyExc_ValueError, "Forest: add_feature out of range");
            goto fail;
        }
    }
    for (Py_ssize_t t = 0; t < self->n_trees; t++) {
        if (self->roots[t] < 0 || self->roots[t] >= n) {
            PyErr_SetString(PyExc_ValueError, "Forest: a root is out of range");
            goto fail;
        }
    }
    PyMem_Free(starts);
    return (PyObject *)self;
fail:
    PyMem_Free(starts);
    Py_DECREF(self);
    return NULL;
}

#define MAX_TOP 16

static PyObject *
Forest_walk(Forest *self, PyObject *args)
{
    PyObject *values;
    Py_ssize_t k;
    if (!PyArg_ParseTuple(args, "O!n:walk", &PyTuple_Type, &values, &k))
        return NULL;
    if (PyTuple_GET_SIZE(values) != self->n_features) {
        PyErr_Format(PyExc_TypeError, "walk: expected a tuple of %zd numbers", self->n_features);
        return NULL;
    }
    if (k < 0 || k > MAX_TOP) {
        PyErr_Format(PyExc_ValueError, "walk: k must be 0 to %d", MAX_TOP);
        return NULL;
    }
    Py_ssize_t n = self->n_features;
    double stack_x[64], stack_c[64];
    double *x = stack_x, *c = stack_c;
    if (n > 64) {
        x = PyMem_Malloc(n * sizeof(double));
        c = PyMem_Malloc(n * sizeof(double));
        if (x == NULL || c == NULL) {
            PyMem_Free(x == stack_x ? NULL : x);
            PyMem_Free(c == stack_c ? NULL : c);
            return PyErr_NoMemory();
        }
    }
    PyObject *result = NULL, *credits = NULL, *order = NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyTuple_GET_ITEM(values, i);
        if (!PyFloat_CheckExact(item)) {
            /* As float(item) does: the generated Python converts every value the same way. */
            PyObject *number = PyNumber_Float(item);
            if (number == NULL)
                goto done;
            x[i] = PyFloat_AS_DOUBLE(number);
            Py_DECREF(number);
        }
        else
            x[i] = PyFloat_AS_DOUBLE(item);
        c[i] = 0.0;
    }
    const int *feature = self->feature, *left = self->left, *right = self->right;
    const double *threshold = self->threshold;
    for (Py_ssize_t t = 0; t < self->n_trees; t++) {
        int node = self->roots[t];
        int f;
        while ((f = feature[node]) >= 0)
            node = x[f] <= threshold[node] ? left[node] : right[node];
        for (Py_ssize_t k = self->add_start[node]; k < self->add_start[node + 1]; k++)
            c[self->add_feature[k]] += self->add_credit[k];
    }
    Py_ssize_t top[MAX_TOP], found = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        double size = fabs(c[i]);
        if (size == 0.0)
            continue;
        /* Insert after every kept credit at least as large: ties keep the lower index. */
        Py_ssize_t at = found;
        while (at > 0 && fabs(c[top[at - 1]]) < size)
            at--;
        if (at >= k)
            continue;
        for (Py_ssize_t j = (found < k ? found : k - 1); j > at; j--)
            top[j] = top[j - 1];
        top[at] = i;
        if (found < k)
            found++;
    }
    credits = PyTuple_New(n);
    order = PyTuple_New(found);
    if (credits == NULL || order == NULL)
        goto fail;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyFloat_FromDouble(c[i]);
        if (item == NULL)
            goto fail;
        PyTuple_SET_ITEM(credits, i, item);
    }
    for (Py_ssize_t j = 0; j < found; j++) {
        PyObject *item = PyLong_FromSsize_t(top[j]);
        if (item == NULL)
            goto fail;
        PyTuple_SET_ITEM(order, j, item);
    }
    if ((result = PyTuple_New(2)) == NULL)
        goto fail;
    PyTuple_SET_ITEM(result, 0, credits);
    PyTuple_SET_ITEM(result, 1, order);
    goto done;
fail:
    Py_XDECREF(credits);
    Py_XDECREF(order);
done:
    if (x != stack_x) {
        PyMem_Free(x);
        PyMem_Free(c);
    }
    return result;
}

static PyMethodDef Forest_methods[] = {
    {"walk", (PyCFunction)Forest_walk, METH_VARARGS,
     "walk(values, k) -> (credits, top): credits per input, the k largest."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ForestType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "detector.model._forest.Forest",
    .tp_basicsize = sizeof(Forest),
    .tp_dealloc = (destructor)Forest_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A tree ensemble's splits and leaf credits, walked in C.",
    .tp_methods = Forest_methods,
    .tp_new = Forest_new,
};

static struct PyModuleDef forest_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "detector.model._forest",
    .m_doc = "The tree model's walk in C (optional; detector.model falls back to Python).",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__forest(void)
{
    if (PyType_Ready(&ForestType) < 0)
        return NULL;
    PyObject *module = PyModule_Create(&forest_module);
    if (module == NULL)
        return NULL;
    Py_INCREF(&ForestType);
    if (PyModule_AddObject(module, "Forest", (PyObject *)&ForestType) < 0) {
        Py_DECREF(&ForestType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
