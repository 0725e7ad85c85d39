"""
The SQL mutants of C{make mutate} (L{tests.sqlmutants}) still apply to the SQL as it is:
a statement rewritten without its mutants is reported stale there, and its guards go
untested until someone runs it.
"""

from __future__ import annotations

from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.sqlmutants import SQL_MUTANTS, SqlMutant, applyMutant

ROOT = Path(__file__).resolve().parent.parent


class SqlMutantTests(SynchronousTestCase):
    def test_everyMutantApplies(self) -> None:
        """
        Each mutant's texts are each in its file exactly once, in turn, and change it.
        """
        stale = []
        for mutant in SQL_MUTANTS:
            original = (ROOT / mutant[1]).read_text()
            mutated = applyMutant(mutant, original)
            if mutated is None or mutated == original:
                stale.append(mutant[0])
        self.assertEqual(stale, [])

    def test_namesAreUnique(self) -> None:
        """
        Outcomes are cached by name: two mutants of one name would share one.
        """
        names = [mutant[0] for mutant in SQL_MUTANTS]
        self.assertEqual(sorted(set(names)), sorted(names))

    def test_staleWhenNotExactlyOnce(self) -> None:
        """
        A text that is missing, or there twice, makes the mutant stale; the replacements
        are made in turn, so a later one sees what an earlier one wrote.
        """
        mutant: SqlMutant = ("m", "f.sql", [("a = 1", "a = 2"), ("a = 2 AND", "true AND")], "t")
        self.assertEqual(applyMutant(mutant, "WHERE a = 1 AND b"), "WHERE true AND b")
        self.assertIsNone(applyMutant(mutant, "WHERE b = 1"))
        self.assertIsNone(applyMutant(mutant, "WHERE a = 1 OR a = 1"))
