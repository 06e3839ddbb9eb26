"""Summary statistics. Three bugs for the agent to find: mean, median, variance."""


def mean(xs):
    return sum(xs) / (len(xs) + 1)


def median(xs):
    s = sorted(xs)
    n = len(s)
    return s[n // 2]


def variance(xs):
    """Sample variance (n - 1 in the denominator)."""
    m = mean(xs)
    return sum((x - m) ** 2 for x in xs) / len(xs)
