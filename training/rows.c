/* The fused CE + cached-KD loss (training/losses.py, ce_and_cached_kl) on the CPU, a row at a time.

   Compiled on first use by training/native.py. Each row of V logits is read while it sits in the
   L1 cache (its max, then its exponentials), and the row's k head entries and label are handled
   in the same visit. The torch ops of losses._FusedCEKL compute the same thing in ~40 ops over
   chunks of rows, each op a few microseconds of dispatch, which on a small student's logits
   outweighs the arithmetic (docs/log.md). teacher_buckets and sampled_targets, at the end, do the
   same for the losses functions of those names (a top-k cache's head and tail; a sampled cache's
   draws, reweighted, repeats merged).

   The maths, per row r with label y (negative: ignored, CE and KL 0):
     lse = logsumexp(x), ce = lse - x[y]
     lse_T = logsumexp(x / T), q_i = exp(x[id_i] / T - lse_T) over the k head ids
     tail = 1 - sum' q_i (sum' counts a repeated id once: a repeat is adjacent to its id's first
                            slot and holds the same p, as sampled_targets leaves it)
     kl = sum' p_i (log p_i - log q_i) + p_tail log p_tail - p_tail log max(tail, floor)
   and the gradient of w_ce ce + w_kl kl, for tail tokens and head ids:
     softmax(x)_j w_ce + q_j c w_kl / T,  and  softmax(x)_j w_ce + (q_j h - p_j) w_kl / T,
   with c = (tail - p_tail) / tail and h = 1 while tail >= floor, c = h = 1 - p_tail below it,
   minus w_ce at y.

   Built without -ffast-math: NaN must stay NaN. The flags allow only reassociation (to sum in
   vector lanes); the max loop alone assumes finite values, and a row holding a NaN or an
   infinity gets NaN log-sums from a row-sum check instead. */

#include <math.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define HEAD_BLOCK 64
#define MAX_THREADS 64
/* the fewest logits a thread gets: a call with fewer than twice this runs on one thread, since
   splitting bench.student's ~2^19 logits in two gained nothing (docs/log.md) */
#define ELEMENTS_PER_THREAD (1 << 18)

/* exp(x) for x <= 88 in a form the compiler vectorises (libm's expf is a call): 2^n p(r) with
   |r| <= ln(2)/2 and Cephes's degree-6 polynomial for p (~1 ulp). Arguments below -87 give
   2^-126 p(r), ~1e-38, the floor of a normal float. Every caller passes a logit shifted by its
   row's max or logsumexp, or a log-probability, so nothing near 88 comes here. exp_above takes
   max(x, lo) for a floor lo >= -87 (one clamp: gcc vectorises no loop with two in a row). */
static inline float exp_above(float x, float lo) {
    x = x < lo ? lo : x;
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

static inline float fast_exp(float x) { return exp_above(x, -87.0f); }

/* log(x) for normal x > 0 in a form the compiler vectorises: x = 2^e f with f in [sqrt(1/2),
   sqrt(2)), log f by Cephes's degree-8 polynomial (~1 ulp). */
static inline float fast_log(float x) {
    int32_t bits;
    memcpy(&bits, &x, sizeof bits);
    float e = (float)(((bits >> 23) & 0xff) - 126);
    bits = (bits & 0x807fffff) | 0x3f000000; /* f in [0.5, 1) */
    float f;
    memcpy(&f, &bits, sizeof f);
    int small = f < 0.70710678f;
    e = small ? e - 1.0f : e;
    f = small ? f + f - 1.0f : f - 1.0f;
    float z = f * f;
    float y = 7.0376836292e-2f;
    y = y * f - 1.1514610310e-1f;
    y = y * f + 1.1676998740e-1f;
    y = y * f - 1.2420140846e-1f;
    y = y * f + 1.4249322787e-1f;
    y = y * f - 1.6668057665e-1f;
    y = y * f + 2.0000714765e-1f;
    y = y * f - 2.4999993993e-1f;
    y = y * f + 3.3333331174e-1f;
    y = y * f * z - 2.12194440e-4f * e - 0.5f * z;
    return f + y + 0.693359375f * e;
}

/* exp(x / 2^roots) for roots 0, 1 or 2, x <= 0, with x / 2^roots floored at -87 / 2^roots so that
   its square (`squared`) stays a normal float, as fast_exp keeps exp(x). */
static inline float tempered_exp(float x, int roots) {
    float scale = roots == 0 ? 1.0f : roots == 1 ? 0.5f : 0.25f;
    return exp_above(x * scale, -87.0f * scale);
}

/* t^(2^roots): exp(x) from tempered_exp(x, roots), a multiply or two where taking the tempered
   value from exp(x) would cost square roots (several times a multiply). */
static inline float squared(float t, int roots) {
    if (roots >= 1) t *= t;
    if (roots >= 2) t *= t;
    return t;
}

/* max_j row[j] * scale */
__attribute__((optimize("finite-math-only")))
static float max_of(const float *row, int64_t n, float scale) {
    float m = row[0] * scale;
    for (int64_t j = 1; j < n; j++) m = row[j] * scale > m ? row[j] * scale : m;
    return m;
}

static float sum_of(const float *row, int64_t n) {
    float s = 0.0f;
    for (int64_t j = 0; j < n; j++) s += row[j];
    return s;
}

/* g = softmax(row) w_ce + softmax(row)^(1/2^roots) u; roots a constant at each call, so that
   each loop compiles without the branches (they keep it from vectorising). */
static inline __attribute__((always_inline)) void mix_rooted(
        const float *row, int64_t vocab, float lse, float w_ce, float u, int roots, float *g) {
    for (int64_t j = 0; j < vocab; j++) {
        float t = tempered_exp(row[j] - lse, roots);
        g[j] = squared(t, roots) * w_ce + t * u;
    }
}

/* s = sum exp(row - m), s_tempered = sum exp((row - m) / 2^roots); roots a constant at each call
   (see mix_rooted). */
static inline __attribute__((always_inline)) void tempered_sums(
        const float *row, int64_t vocab, float m, int roots, float *s, float *s_tempered) {
    float plain = 0.0f, tempered = 0.0f;
    for (int64_t j = 0; j < vocab; j++) {
        float t = tempered_exp(row[j] - m, roots);
        plain += squared(t, roots);
        tempered += t;
    }
    *s = plain;
    *s_tempered = tempered;
}

/* head[i] = the gradient of head id i (see backward_rows) from q[i], its student probability at
   T = 2^roots: softmax(x) w_ce there is q[i]^T softmax_scale, with softmax_scale =
   w_ce exp(T lse_T - lse). roots a constant at each call (see mix_rooted). */
static inline __attribute__((always_inline)) void head_rooted(
        const float *q, const float *log_p, int64_t n, float softmax_scale, float head_coef,
        float w_kl, int roots, float *head) {
    for (int64_t i = 0; i < n; i++)
        head[i] = squared(q[i], roots) * softmax_scale + (q[i] * head_coef - fast_exp(log_p[i])) * w_kl;
}

/* On entry q_row holds the head ids' logits, on return their probabilities at T; q_sum and cross
   are sum' q_i and sum' p_i (log p_i - log q_i), a slot that repeats the id before it weighing 0.
   weight is NULL (no repeats in the row: every top-k row) or a HEAD_BLOCK buffer at each call,
   so that the loops compile without the branch (it keeps them from vectorising). The weights
   are made a block at a time before the exps: compared inside their loop, the int64 ids would
   halve its vector width and slow the kernel (docs/log.md). */
static inline __attribute__((always_inline)) void head_terms(
        float *q_row, const float *log_p, const int64_t *ids, int64_t k, float inv_t, float lse_t,
        float *weight, float *q_sum, float *cross) {
    float q_total = 0.0f, cross_total = 0.0f;
    for (int64_t start = 0; start < k; start += HEAD_BLOCK) {
        int64_t n = k - start < HEAD_BLOCK ? k - start : HEAD_BLOCK;
        if (weight != NULL) {
            weight[0] = start == 0 || ids[start] != ids[start - 1];
            for (int64_t i = 1; i < n; i++) weight[i] = ids[start + i] != ids[start + i - 1];
        }
        for (int64_t i = 0; i < n; i++) {
            float log_q = q_row[start + i] * inv_t - lse_t;
            float w = weight != NULL ? weight[i] : 1.0f;
            q_row[start + i] = fast_exp(log_q);
            q_total += w * q_row[start + i];
            cross_total += w * fast_exp(log_p[start + i]) * (log_p[start + i] - log_q);
        }
    }
    *q_sum = q_total;
    *cross = cross_total;
}

/* Whether some slot of ids (k) repeats the id before it. */
static int has_repeats(const int64_t *ids, int64_t k) {
    int repeats = 0;
    for (int64_t i = 1; i < k; i++) repeats |= ids[i] == ids[i - 1];
    return repeats;
}

static float xlogx(float x) { return x > 0.0f ? x * logf(x) : 0.0f; }

/* The teacher side of a cached-KD loss: k entries a row. */
typedef struct {
    int64_t k;
    const int64_t *ids;    /* (rows, k) head ids */
    const float *log_p;    /* (rows, k) teacher log-probabilities at T of the head ids */
    const float *p_tail;   /* (rows,) teacher tail mass */
    float inv_temperature;
    int roots;             /* 0-2: T = 2^roots, plain exps as squares of tempered ones; -1: exps */
    float tail_floor;
} Teacher;

/* One call's tensors. The forward writes lse, ce and, with a teacher, lse_tempered, q (rows, k:
   the head ids' student probabilities at T), tail (1 - sum' q, before the floor) and kl; the
   backward reads them, with grad_ce and grad_kl, and writes grad (rows, vocab). */
typedef struct {
    const float *x;
    int64_t rows, vocab;
    const int64_t *labels;
    const Teacher *teacher; /* NULL: CE only */
    float *lse, *ce, *lse_tempered, *q, *tail, *kl;
    const float *grad_ce, *grad_kl;
    float *grad;
} Call;

/* Rows [first, last) of the forward. Returns 1 (outputs undefined) when a label or head id is
   outside [0, vocab) (a label < 0 is ignored), else 0. */
static int forward_rows(const Call *c, int64_t first, int64_t last) {
    const Teacher *teacher = c->teacher;
    int64_t vocab = c->vocab;
    for (int64_t r = first; r < last; r++) {
        const float *row = c->x + r * vocab;
        float m = max_of(row, vocab, 1.0f), total = sum_of(row, vocab);
        float nan_if_not_finite = total - total;
        float s = 0.0f, s_tempered = 0.0f;
        if (teacher == NULL || teacher->roots == 0) {
            for (int64_t j = 0; j < vocab; j++) s += fast_exp(row[j] - m);
            s_tempered = s; /* T = 1: the tempered sum is the plain one (unused for CE) */
        } else if (teacher->roots == 1) {
            tempered_sums(row, vocab, m, 1, &s, &s_tempered);
        } else if (teacher->roots == 2) {
            tempered_sums(row, vocab, m, 2, &s, &s_tempered);
        } else {
            for (int64_t j = 0; j < vocab; j++) {
                float shifted = row[j] - m;
                s += fast_exp(shifted);
                s_tempered += fast_exp(shifted * teacher->inv_temperature);
            }
        }
        c->lse[r] = logf(s) + m + nan_if_not_finite;
        int64_t y = c->labels[r];
        if (y >= vocab) return 1;
        c->ce[r] = y < 0 ? 0.0f : c->lse[r] - row[y];
        if (teacher == NULL) continue;

        int64_t k = teacher->k;
        float inv_t = teacher->inv_temperature;
        float lse_t = logf(s_tempered) + m * inv_t + nan_if_not_finite;
        const int64_t *ids = teacher->ids + r * k;
        const float *log_p = teacher->log_p + r * k;
        float *q_row = c->q + r * k;
        int outside = 0;
        for (int64_t i = 0; i < k; i++) outside |= ids[i] < 0 || ids[i] >= vocab;
        if (outside) return 1;
        for (int64_t i = 0; i < k; i++) q_row[i] = row[ids[i]];
        float q_sum, cross;
        float weight[HEAD_BLOCK];
        if (has_repeats(ids, k))
            head_terms(q_row, log_p, ids, k, inv_t, lse_t, weight, &q_sum, &cross);
        else
            head_terms(q_row, log_p, ids, k, inv_t, lse_t, NULL, &q_sum, &cross);
        float p_tail = teacher->p_tail[r];
        float free_tail = 1.0f - q_sum;
        float floored = free_tail >= teacher->tail_floor ? free_tail : teacher->tail_floor;
        c->lse_tempered[r] = lse_t;
        c->tail[r] = free_tail;
        c->kl[r] = y < 0 ? 0.0f : cross + xlogx(p_tail) - p_tail * logf(floored);
    }
    return 0;
}

/* Rows [first, last) of the gradient of sum_r grad_ce[r] ce[r] + grad_kl[r] kl[r]. */
static int backward_rows(const Call *c, int64_t first, int64_t last) {
    const Teacher *teacher = c->teacher;
    int64_t vocab = c->vocab, k = teacher ? teacher->k : 0;
    for (int64_t r = first; r < last; r++) {
        const float *row = c->x + r * vocab;
        float *g = c->grad + r * vocab;
        int64_t y = c->labels[r];
        float a = c->lse[r], w_ce = y < 0 ? 0.0f : c->grad_ce[r];
        if (teacher == NULL) {
            for (int64_t j = 0; j < vocab; j++) g[j] = fast_exp(row[j] - a) * w_ce;
            if (y >= 0) g[y] -= w_ce;
            continue;
        }
        float inv_t = teacher->inv_temperature;
        int roots = teacher->roots; /* a local: grad's stores might alias teacher->roots */
        float w_kl = y < 0 ? 0.0f : c->grad_kl[r] * inv_t;
        float p_tail = teacher->p_tail[r], tail = c->tail[r];
        int free_tail = tail >= teacher->tail_floor;
        float tail_coef = (free_tail ? (tail - p_tail) / tail : 1.0f - p_tail) * w_kl;
        float head_coef = free_tail ? 1.0f : 1.0f - p_tail;
        const int64_t *ids = teacher->ids + r * k;
        const float *log_p = teacher->log_p + r * k;
        const float *q_row = c->q + r * k;
        if (roots >= 0) {
            /* softmax(x / T) = softmax(x)^(1/T) exp(lse / T - lse_T) */
            float u = tail_coef * expf(a * inv_t - c->lse_tempered[r]);
            if (roots == 0) mix_rooted(row, vocab, a, w_ce, u, 0, g);
            else if (roots == 1) mix_rooted(row, vocab, a, w_ce, u, 1, g);
            else mix_rooted(row, vocab, a, w_ce, u, 2, g);
        } else {
            float b = c->lse_tempered[r];
            for (int64_t j = 0; j < vocab; j++)
                g[j] = fast_exp(row[j] - a) * w_ce + fast_exp(row[j] * inv_t - b) * tail_coef;
        }
        /* the head's terms replace the tail's (a repeated id writes the same value each time),
           HEAD_BLOCK at a time: computed in vector lanes, scattered. At T = 2^roots from the
           forward's q alone (head_rooted); at other T from the gathered logits, an exp each. */
        float head[HEAD_BLOCK];
        float softmax_scale = roots >= 0 ? w_ce * expf((float)(1 << roots) * c->lse_tempered[r] - a)
                                         : 0.0f;
        for (int64_t start = 0; start < k; start += HEAD_BLOCK) {
            int64_t n = k - start < HEAD_BLOCK ? k - start : HEAD_BLOCK;
            const float *q = q_row + start, *lp = log_p + start;
            if (roots == 0) head_rooted(q, lp, n, softmax_scale, head_coef, w_kl, 0, head);
            else if (roots == 1) head_rooted(q, lp, n, softmax_scale, head_coef, w_kl, 1, head);
            else if (roots == 2) head_rooted(q, lp, n, softmax_scale, head_coef, w_kl, 2, head);
            else {
                for (int64_t i = 0; i < n; i++) head[i] = row[ids[start + i]];
                for (int64_t i = 0; i < n; i++)
                    head[i] = fast_exp(head[i] - a) * w_ce
                              + (q[i] * head_coef - fast_exp(lp[i])) * w_kl;
            }
            for (int64_t i = 0; i < n; i++) g[ids[start + i]] = head[i];
        }
        if (y >= 0) g[y] -= w_ce;
    }
    return 0;
}

typedef int (*RowsFunction)(const Call *, int64_t, int64_t);

typedef struct {
    RowsFunction function;
    const Call *call;
    int64_t first, last;
    int result;
} Part;

static void *run_part(void *arg) {
    Part *part = arg;
    part->result = part->function(part->call, part->first, part->last);
    return NULL;
}

/* function over all rows, split into up to `threads` parts run at once (no more parts than
   ELEMENTS_PER_THREAD allows); a part whose thread cannot start runs here. Returns the parts'
   results or'ed. */
static int over_rows(RowsFunction function, const Call *c, int threads) {
    int64_t by_size = c->rows * c->vocab / ELEMENTS_PER_THREAD;
    int n = threads < by_size ? threads : (int)by_size;
    n = n > MAX_THREADS ? MAX_THREADS : n < 1 ? 1 : n;
    Part parts[MAX_THREADS];
    pthread_t handles[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int i = 0; i < n; i++) {
        parts[i] = (Part){function, c, c->rows * i / n, c->rows * (i + 1) / n, 0};
        if (i > 0) started[i] = pthread_create(&handles[i], NULL, run_part, &parts[i]) == 0;
    }
    int result = 0;
    for (int i = 0; i < n; i++) {
        if (!started[i]) run_part(&parts[i]);
        else pthread_join(handles[i], NULL);
        result |= parts[i].result;
    }
    return result;
}

int fused_forward(const Call *call, int threads) {
    return over_rows(forward_rows, call, threads);
}

int fused_backward(const Call *call, int threads) {
    return over_rows(backward_rows, call, threads);
}

/* losses.teacher_buckets at a stored temperature, over rows of k cached logits z: log_p = z / T -
   lse_T and p_tail = 1 - sum exp(log_p), floored at 0 (NaN stays NaN); lse_T is every
   lse_stride-th float of lse. */
void teacher_buckets(const float *z, const float *lse, int64_t lse_stride, int64_t rows, int64_t k,
                     float inv_t, float *log_p, float *p_tail) {
    for (int64_t r = 0; r < rows; r++) {
        const float *zr = z + r * k;
        float *lp = log_p + r * k, lse_t = lse[r * lse_stride], head = 0.0f;
        for (int64_t i = 0; i < k; i++) {
            lp[i] = zr[i] * inv_t - lse_t;
            head += fast_exp(lp[i]);
        }
        p_tail[r] = head > 1.0f ? 0.0f : 1.0f - head;
    }
}

/* Sums each run of repeated ids in w into every slot of the run. Runs are rare (a few in 64
   draws), so a branch per slot would mostly mispredict on their edges: the slots that repeat the
   id before them are collected as a bit mask, 64 at a time, and only its set bits are visited. */
static void merge_runs(const int64_t *id, int64_t m, float *w) {
    int64_t merged = 1; /* slots below it belong to runs already summed */
    for (int64_t base = 1; base < m; base += 64) {
        int64_t n = m - base < 64 ? m - base : 64;
        uint64_t repeats = 0;
        for (int64_t j = 0; j < n; j++) repeats |= (uint64_t)(id[base + j] == id[base + j - 1]) << j;
        if (merged > base) /* a run from the last word reaches into this one */
            repeats &= merged - base >= 64 ? 0 : ~0ULL << (merged - base);
        while (repeats) {
            int64_t start = base + __builtin_ctzll(repeats) - 1, end = start + 2;
            while (end < m && id[end] == id[start]) end++;
            float run = 0.0f;
            for (int64_t t = start; t < end; t++) run += w[t];
            for (int64_t t = start; t < end; t++) w[t] = run;
            merged = end;
            repeats &= end - base >= 64 ? 0 : ~0ULL << (end - base);
        }
    }
}

/* losses.sampled_targets over rows of m draws whose repeats are adjacent: each draw weighs
   w = softmax(z * scale) over its row (scale = 1/T - 1/T_s), and every slot of a run of repeats
   gets the log of the run's summed w. At scale 0 (T = T_s) the weights are all 1/m and z is not
   read. */
void sampled_targets(const int64_t *ids, const float *z, int64_t rows, int64_t m, float scale,
                     float *log_p) {
    for (int64_t r = 0; r < rows; r++) {
        const int64_t *id = ids + r * m;
        float *w = log_p + r * m, log_total;
        if (scale == 0.0f) {
            for (int64_t i = 0; i < m; i++) w[i] = 1.0f;
            log_total = fast_log((float)m);
        } else {
            const float *zr = z + r * m;
            float top = max_of(zr, m, scale), total = 0.0f;
            for (int64_t i = 0; i < m; i++) {
                w[i] = fast_exp(zr[i] * scale - top);
                total += w[i];
            }
            log_total = fast_log(total);
        }
        merge_runs(id, m, w);
        for (int64_t i = 0; i < m; i++) w[i] = fast_log(w[i]) - log_total;
    }
}

/* losses.mixture_targets: `members` teachers' targets, member m's ids and log_p rows of
   widths[m] slots at ids[m] and log_p_in[m], mixed with weights[m] into rows of k = sum widths
   slots. A run of repeats holds its id's total at each slot, so only a run's first slot counts:
   its share is weight * exp(log_p). Shares are summed per id in `scratch` (vocab floats, zero on
   entry and on return), so no sort is needed. The row's distinct ids come out in the order of
   their first slots, each with the log of its sum, and the slots left over repeat the last one
   (adjacent repeats count once in the loss). The members are read in place: concatenating them
   first would cost fresh pages of memory per step. Returns 1, writing nothing more, at an id
   outside [0, vocab). */
int mixture_targets(const int64_t *const *ids, const float *const *log_p_in,
                    const float *weights, const int64_t *widths, int64_t members, int64_t rows,
                    int64_t vocab, float *scratch, int64_t *ids_out, float *log_p) {
    int64_t k = 0;
    for (int64_t m = 0; m < members; m++) k += widths[m];
    for (int64_t r = 0; r < rows; r++) {
        int64_t *out = ids_out + r * k, n = 0;
        float *lp = log_p + r * k;
        /* the row's slots and their shares, in place in the outputs (vector loops: exp and log
           are the arithmetic here) */
        for (int64_t m = 0, at = 0; m < members; at += widths[m++]) {
            const int64_t *id = ids[m] + r * widths[m];
            const float *in = log_p_in[m] + r * widths[m];
            for (int64_t i = 0; i < widths[m]; i++) out[at + i] = id[i];
            for (int64_t i = 0; i < widths[m]; i++) lp[at + i] = weights[m] * fast_exp(in[i]);
            for (int64_t i = 1; i < widths[m]; i++) lp[at + i] = id[i] != id[i - 1] ? lp[at + i] : 0.0f;
        }
        for (int64_t i = 0; i < k; i++) {
            if (out[i] < 0 || out[i] >= vocab) {
                for (int64_t j = 0; j < i; j++) scratch[out[j]] = 0.0f;
                return 1;
            }
            scratch[out[i]] += lp[i];
        }
        for (int64_t i = 0; i < k; i++) { /* compacted in place: n <= i */
            int64_t id = out[i];
            float total = scratch[id];
            if (total < 0.0f) continue; /* emitted already */
            out[n] = id;
            lp[n++] = total;
            scratch[id] = -1.0f;
        }
        for (int64_t j = 0; j < n; j++) {
            scratch[out[j]] = 0.0f;
            /* a total that underflowed to 0 becomes e^-69, as good as 0 in the loss */
            lp[j] = fast_log(lp[j] > 1e-30f ? lp[j] : 1e-30f);
        }
        for (int64_t j = n; j < k; j++) {
            out[j] = out[n - 1];
            lp[j] = lp[n - 1];
        }
    }
    return 0;
}
