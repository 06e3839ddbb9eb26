import unittest

from stats import mean, median, variance


class MeanTest(unittest.TestCase):
    def test_small(self):
        self.assertAlmostEqual(mean([1, 2, 3, 4]), 2.5)

    def test_single(self):
        self.assertAlmostEqual(mean([7]), 7)


class MedianTest(unittest.TestCase):
    def test_odd(self):
        self.assertEqual(median([5, 1, 3]), 3)

    def test_even(self):
        self.assertAlmostEqual(median([4, 1, 3, 2]), 2.5)


class VarianceTest(unittest.TestCase):
    def test_sample(self):
        self.assertAlmostEqual(variance([2, 4, 4, 4, 5, 5, 7, 9]), 32 / 7)

    def test_pair(self):
        self.assertAlmostEqual(variance([1, 3]), 2)


if __name__ == "__main__":
    unittest.main()
