/* Area downscales of an 8-bit grey image in one pass, without a stored summed-area table: the
 * native twin of edgebc/area.py's cell_means, equal to it bit for bit (edgebc/area.py's
 * native_kernel_status checks that before it uses this library; tests/test_area_native.py too).
 *
 * Why: numpy reads the corners of the cell grid out of a 3 MB table with gathers and float64
 * temporaries, 0.8 ms a 1080p cart frame for the gate's copy and the model's input; here one pass
 * keeps running column sums (4 KB), makes a table row only where the grid needs one, and reads
 * its corners there. The arithmetic is numpy's, operation for operation and in float64 (build
 * with -ffp-contract=off: a fused multiply-add rounds once where numpy rounds twice):
 *
 *   corner across a row   left + (double)(right - left) * xfrac       (_across)
 *   corner down           upper + (lower - upper) * yfrac             (cell_means' grid)
 *   cell sum              (g[k+1][j+1] - g[k][j+1]) - (g[k+1][j] - g[k][j])   (np.diff twice)
 *   mean                  sum * inverse_area, clipped to [0, 255], rounded half to even.
 *
 * No Python API: loaded with ctypes, so it builds against no headers but the C library's. It
 * lives in a folder that is not a Python package, so nothing walking edgebc's modules imports it.
 */
#include <float.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#if defined(__FAST_MATH__)
#error "area_kernel.c must not be built with -ffast-math: it must round as numpy does"
#endif
#if !defined(FLT_EVAL_METHOD) || FLT_EVAL_METHOD != 0
#error "area_kernel.c needs doubles evaluated as doubles (no x87 excess precision)"
#endif

/* The SHA-256 of this file, compiled in by setup.py: edgebc/area_native.py loads the library only
 * if it matches the source shipped beside it (an editable install keeps its old build after the
 * source changes, and a library built from another source could crash the process). */
#ifndef EDGEBC_AREA_SOURCE_SHA256
#define EDGEBC_AREA_SOURCE_SHA256 "unknown"
#endif
const char *edgebc_area_source_sha256(void) { return EDGEBC_AREA_SOURCE_SHA256; }

/* One output size: the grid's corner rows and columns as (table index at or below, fraction
 * above it), from edgebc.area._edges; out is out_h x out_w, rows contiguous. */
typedef struct {
    int32_t out_h, out_w;
    const intptr_t *rows_below;
    const double *row_fractions;
    const intptr_t *cols_below;
    const double *col_fractions;
    double inverse_area;
    uint8_t *out;
} edgebc_area_plan;

/* Round half to even for 0 <= value <= 255: adding and removing 1.5 * 2^52 leaves the nearest
 * integer under the default rounding mode, as np.rint does, without a libm call. */
static inline uint8_t round_level(double value) {
    const double magic = 6755399441055744.0;
    return (uint8_t)(int32_t)((value + magic) - magic);
}

/* table[0] = 0, table[x + 1] = columns[0] + ... + columns[x]: four running sums at once (one
 * chain of dependent additions would wait on every one), joined afterwards. */
static void table_row(const int32_t *columns, int32_t cols, int32_t *table) {
    const int32_t quarter = cols / 4;
    int32_t a = 0, b = 0, c = 0, d = 0;
    table[0] = 0;
    for (int32_t x = 0; x < quarter; x++) {
        a += columns[x];
        table[x + 1] = a;
        b += columns[quarter + x];
        table[quarter + x + 1] = b;
        c += columns[2 * quarter + x];
        table[2 * quarter + x + 1] = c;
        d += columns[3 * quarter + x];
        table[3 * quarter + x + 1] = d;
    }
    for (int32_t x = 4 * quarter; x < cols; x++) {
        d += columns[x];
        table[x + 1] = d;
    }
    const int32_t after_a = a, after_b = a + b, after_c = a + b + c;
    for (int32_t x = quarter + 1; x <= 2 * quarter; x++) table[x] += after_a;
    for (int32_t x = 2 * quarter + 1; x <= 3 * quarter; x++) table[x] += after_b;
    for (int32_t x = 3 * quarter + 1; x <= cols; x++) table[x] += after_c;
}

/* The table row read at every corner's fractional column. */
static void across(const int32_t *table, const edgebc_area_plan *plan, double *corners) {
    for (int32_t j = 0; j <= plan->out_w; j++) {
        const int32_t left = table[plan->cols_below[j]], right = table[plan->cols_below[j] + 1];
        corners[j] = (double)left + (double)(int32_t)(right - left) * plan->col_fractions[j];
    }
}

/* Per size: the corner rows read so far (upper, lower), the grid's previous and current rows. */
typedef struct {
    int32_t next;      /* the next grid row to make */
    intptr_t lower_at; /* the table row `lower` was read at, -1 before any */
    double *upper, *lower, *previous, *current;
} progress;

static int needs_row(const edgebc_area_plan *plan, const progress *done, intptr_t row) {
    /* grid row k reads table rows rows_below[k] and rows_below[k] + 1, in increasing k */
    if (done->next > plan->out_h) return 0;
    const intptr_t below = plan->rows_below[done->next];
    return below == row || below + 1 == row;
}

static void emit(const edgebc_area_plan *plan, progress *done, const int32_t *above,
                 const int32_t *table, intptr_t row) {
    while (done->next <= plan->out_h && plan->rows_below[done->next] + 1 == row) {
        const int32_t k = done->next;
        double *swap;
        if (done->lower_at == row - 1) { /* the row above was read as the last grid row's lower */
            swap = done->upper;
            done->upper = done->lower;
            done->lower = swap;
        } else {
            across(above, plan, done->upper);
        }
        if (done->lower_at != row) across(table, plan, done->lower); /* else: the same row */
        done->lower_at = row;
        const double fraction = plan->row_fractions[k];
        for (int32_t j = 0; j <= plan->out_w; j++)
            done->current[j] = done->upper[j] + (done->lower[j] - done->upper[j]) * fraction;
        if (k > 0) {
            double *down = done->previous; /* reused: grid row k - 1 is not read again */
            for (int32_t j = 0; j <= plan->out_w; j++) down[j] = done->current[j] - done->previous[j];
            uint8_t *out = plan->out + (size_t)(k - 1) * (size_t)plan->out_w;
            for (int32_t j = 0; j < plan->out_w; j++) {
                double mean = (down[j + 1] - down[j]) * plan->inverse_area;
                mean = mean < 0.0 ? 0.0 : (mean > 255.0 ? 255.0 : mean);
                out[j] = round_level(mean);
            }
        }
        swap = done->previous;
        done->previous = done->current;
        done->current = swap;
        done->next++;
    }
}

/* Every plan's downscale of `image` (rows x cols, rows `stride` bytes apart). The caller
 * guarantees 255 * rows * cols < 2^31 (the table fits int32) and that every plan downscales:
 * 1 <= out_h <= rows, 1 <= out_w <= cols. Returns 0, or -1 where memory ran out (nothing
 * written then). */
int edgebc_area_downscale(const uint8_t *image, ptrdiff_t stride, int32_t rows, int32_t cols,
                          int32_t count, const edgebc_area_plan *plans) {
    int status = -1;
    int32_t *columns = calloc((size_t)cols, sizeof(int32_t));
    int32_t *tables = calloc(2 * ((size_t)cols + 1), sizeof(int32_t));
    progress *state = calloc((size_t)count, sizeof(progress));
    if (columns == NULL || tables == NULL || state == NULL) goto done;
    for (int32_t s = 0; s < count; s++) {
        const size_t corners = (size_t)plans[s].out_w + 1;
        state[s].lower_at = -1;
        state[s].upper = malloc(corners * sizeof(double));
        state[s].lower = malloc(corners * sizeof(double));
        state[s].previous = malloc(corners * sizeof(double));
        state[s].current = malloc(corners * sizeof(double));
        if (!state[s].upper || !state[s].lower || !state[s].previous || !state[s].current)
            goto done;
    }
    /* table row r (r = 0 .. rows) sums image rows 0 .. r - 1; row 0 is zeros */
    for (int32_t r = 1; r <= rows; r++) {
        const uint8_t *line = image + (ptrdiff_t)(r - 1) * stride;
        for (int32_t x = 0; x < cols; x++) columns[x] += line[x];
        int wanted = 0;
        for (int32_t s = 0; s < count; s++) wanted |= needs_row(&plans[s], &state[s], r);
        if (!wanted) continue;
        int32_t *table = tables + (size_t)(r & 1) * ((size_t)cols + 1);
        const int32_t *above = tables + (size_t)((r - 1) & 1) * ((size_t)cols + 1);
        table_row(columns, cols, table);
        for (int32_t s = 0; s < count; s++) emit(&plans[s], &state[s], above, table, r);
    }
    status = 0;
done:
    if (state != NULL) {
        for (int32_t s = 0; s < count; s++) {
            free(state[s].upper);
            free(state[s].lower);
            free(state[s].previous);
            free(state[s].current);
        }
    }
    free(state);
    free(columns);
    free(tables);
    return status;
}
