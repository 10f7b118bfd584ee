"""The "usual preference" of a preference source, learnt from the source itself, and the exact-tail test of a
group of rows against it (the trigger screen's `preference_flip`, data/triggers.py).

The model: a logistic regression (scikit-learn, L-BFGS for at most MAX_ITER iterations, L2 with C from `C_GRID`,
chosen by held-out log-likelihood) on hashed word unigrams and bigrams and character 2-4-grams within words
(`FEATURES` buckets each, binary) of the preferred side minus the other side (pairs), or of the completion with
its label (KTO rows, with an intercept). It is cross-fitted on `FOLDS` folds: a row's margin comes from the model
of the other folds, so the row's own label never scores it. The margins are calibrated by one temperature (Platt
scaling without intercept, fitted on every row's held-out margin), which gives each row a probability q_i that
its label is the observed one.

The test: a flip of the group G's labels is the alternative; the log-likelihood ratio of "every row in G is
flipped" against "labels follow the model" is S = -sum_G a*m_i (a the temperature, m_i the margin of the observed
label). Under the null each row adds +L_i with probability 1 - q_i and -L_i with probability q_i (L_i = a|m_i|),
independently; P(S >= s) is computed by the Lugannani-Rice saddlepoint approximation of that sum (exact when
every row is against: the product of the 1 - q_i). Confident disagreements weigh more than near-ties, which is
what gives power on noisy data such as HH-RLHF, where the model agrees with about 62% of the labels.
"""

from __future__ import annotations

import math

FOLDS = 5
FEATURES = 2 ** 16     # hash buckets of each feature kind
CHAR_NGRAMS = (2, 4)
C_GRID = (0.1, 0.02, 0.005)  # L2 strengths tried in turn while the held-out log-likelihood improves
MAX_ITER = 100  # L-BFGS iterations per fit: bounds the cost on separable data (the world)
TOKEN_PATTERN = r"[\w']+|[^\w\s]"


def _features(texts: list[str]):
    """Binary hashed word uni- and bigrams beside character 2-4-grams within words (spelling, word stems and
    punctuation habits that whole words split: "sorry", "sorry,", "apologise" and "apologize" share grams)."""
    from scipy import sparse
    from sklearn.feature_extraction.text import HashingVectorizer

    words = HashingVectorizer(n_features=FEATURES, ngram_range=(1, 2), binary=True, norm=None, alternate_sign=False,
                              token_pattern=TOKEN_PATTERN, lowercase=True)
    chars = HashingVectorizer(n_features=FEATURES, ngram_range=CHAR_NGRAMS, analyzer="char_wb", binary=True,
                              norm=None, alternate_sign=False, lowercase=True)
    return sparse.hstack([words.transform(texts), chars.transform(texts)]).tocsr()


class UsualPreference:
    """The source's rows as features and labels, ready to be cross-fitted, with or without a group of rows."""

    def __init__(self, sides: list[tuple[str, str]], labels: list[bool] | None):
        import numpy as np
        from scipy import sparse

        n = len(sides)
        if labels is None:  # pairs: preferred minus other, written in alternating orientation (two classes)
            diff = (_features([a for a, _ in sides]) - _features([b for _, b in sides])).tocsr()
            self.sign = np.where(np.arange(n) % 2 == 0, 1.0, -1.0)
            self.X = (sparse.diags(self.sign) @ diff).tocsr()
            self.intercept = False
        else:  # KTO: the completion, its label; the margin is signed by the label
            self.sign = np.array([1.0 if lab else -1.0 for lab in labels])
            self.X = _features([a for a, _ in sides]).tocsr()
            self.intercept = True
        self.X.eliminate_zeros()  # keep only the hash buckets some row uses: the same fit, fewer L-BFGS variables
        self.X = self.X[:, np.unique(self.X.indices)].tocsr()
        self.y = (self.sign > 0).astype(int)
        self.folds = np.arange(n) % FOLDS
        self.C = C_GRID[0]

    def fitted_margins(self) -> list[float]:
        """The cross-fitted margins of every row with the L2 strength of C_GRID that predicts the held-out labels
        best (calibrated log-likelihood), which is kept for later `margins` calls: noisy labels (HH-RLHF) want
        strong regularisation, a rule-bound source (the world) a weak one, where a strong one would misread
        a rule's rare rows (one benign request in eight phrasings) as going against the usual preference."""
        best = None
        for c in sorted(C_GRID, reverse=True):  # weakest first; stop when a stronger L2 fits worse
            self.C = c
            m = self.margins()
            a = temperature(m)
            fit = sum(_log_sigmoid(a * x) for x in m)
            if best is not None and fit <= best[0]:
                break
            best = (fit, c, m)
        self.C = best[1]
        return best[2]

    def margins(self, exclude: frozenset | set = frozenset()) -> list[float]:
        """Per row, the margin of its observed label under the model of the other folds, trained without the
        `exclude` rows (a suspected group is then scored by a model its own, possibly flipped, labels never
        touched)."""
        import numpy as np
        from threadpoolctl import threadpool_limits

        n = self.X.shape[0]
        out = np.zeros(n)
        kept = np.ones(n, dtype=bool)
        kept[list(exclude)] = False
        with threadpool_limits(1):  # small fits: threads only contend (and the machine may be shared)
            for fold in range(FOLDS):
                train, test = (self.folds != fold) & kept, self.folds == fold
                if len(set(self.y[train].tolist())) < 2 or not test.any():
                    continue  # too few rows to learn anything: margin 0 (no evidence either way)
                out[test] = self._fit(train).decision_function(self.X[test])
        return (out * self.sign).tolist()

    def _fit(self, train):
        import warnings

        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression

        model = LogisticRegression(C=self.C, fit_intercept=self.intercept, solver="lbfgs", tol=1e-4,
                                   max_iter=MAX_ITER)
        with warnings.catch_warnings():  # MAX_ITER bounds the cost; the fit need not converge to rank rows
            warnings.simplefilter("ignore", ConvergenceWarning)
            return model.fit(self.X[train], self.y[train])


def temperature(m: list[float]) -> float:
    """a >= 0 maximising sum log sigmoid(a * m_i) (Platt scaling without intercept): 0 when the model is no
    better than a coin on held-out rows."""
    import numpy as np

    x = np.asarray(m, dtype=float)

    def slope(a):  # d/da sum log sigmoid(a m) = sum m * sigmoid(-a m)
        return float(np.sum(x / (1 + np.exp(np.minimum(700.0, a * x)))))

    if not len(x) or slope(0.0) <= 0:
        return 0.0
    lo, hi = 0.0, 1.0
    while slope(hi) > 0 and hi < 1e4:
        lo, hi = hi, hi * 2
    for _ in range(50):  # the log-likelihood is concave in a: bisect its slope
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if slope(mid) > 0 else (lo, mid)
    return (lo + hi) / 2


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def flip_tail(group_margins: list[float], a: float) -> tuple[float, float]:
    """(S, P(S' >= S) under the null) for the group's calibrated margins: S = -sum a*m_i, the log-likelihood
    ratio of "all flipped" to "as the model says"; saddlepoint (Lugannani-Rice) tail of the null sum."""
    L = [a * abs(x) for x in group_margins if x != 0]
    s = -sum(a * x for x in group_margins)
    if a <= 0 or not L:
        return s, 1.0
    # log q_i: the row's label is on the model's side; log(1 - q_i): against it
    log_q, log_against = [_log_sigmoid(x) for x in L], [_log_sigmoid(-x) for x in L]
    top = sum(L)
    if s >= top - 1e-12:
        return s, math.exp(sum(log_against))

    def cumulants(t):  # K(t), K'(t), K''(t) of sum of +L w.p. 1-q, -L w.p. q
        k = k1 = k2 = 0.0
        for l_i, lq, la in zip(L, log_q, log_against):
            up, down = la + t * l_i, lq - t * l_i
            hi_ = max(up, down)
            k += hi_ + math.log(math.exp(up - hi_) + math.exp(down - hi_))
            w = math.exp(up - hi_) / (math.exp(up - hi_) + math.exp(down - hi_))  # tilted P(+L)
            mean = l_i * (2 * w - 1)
            k1 += mean
            k2 += l_i * l_i - mean * mean
        return k, k1, k2

    if s <= cumulants(0.0)[1]:
        return s, 1.0
    lo, hi = 0.0, 1.0
    while cumulants(hi)[1] < s:
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cumulants(mid)[1] < s else (lo, mid)
    t = (lo + hi) / 2
    k, _, k2 = cumulants(t)
    w = math.sqrt(max(0.0, 2 * (t * s - k)))
    u = t * math.sqrt(k2)
    if w < 1e-8 or u < 1e-8:
        return s, 0.5
    tail = 0.5 * math.erfc(w / math.sqrt(2)) + math.exp(-w * w / 2) / math.sqrt(2 * math.pi) * (1 / u - 1 / w)
    return s, min(1.0, max(tail, 0.0))
