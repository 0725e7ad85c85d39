"""
The migrations folder as C{ctrlgw.store.migrate} reads it: ordered by version, and one file
per version (an install that kept a file its package no longer has must not start).
"""

from __future__ import annotations

from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from ctrlgw.store.migrate import DuplicateMigration, migrations


class MigrationsFolderTests(SynchronousTestCase):
    def folder(self, *names: str) -> Path:
        path = Path(self.mktemp())
        path.mkdir()
        for name in names:
            (path / name).write_text(f"-- {name}\n")
        return path

    def test_inVersionOrder(self) -> None:
        """
        Files named NNNN_name.sql, in version order; anything else is not a migration.
        """
        found = migrations(self.folder("0002_second.sql", "0001_first.sql", "README", "3_x.sql"))
        self.assertEqual([(m.version, m.name) for m in found], [(1, "first"), (2, "second")])
        self.assertEqual(found[0].sql, "-- 0001_first.sql\n")

    def test_twoFilesOfOneVersionRefused(self) -> None:
        """
        Two files of one version stop the start with both names, instead of the second
        failing on schema_migrations' key after the first was applied.
        """
        folder = self.folder("0001_first.sql", "0015_new_name.sql", "0015_old_name.sql")
        error = self.assertRaises(DuplicateMigration, migrations, folder)
        self.assertIn("two migrations numbered 0015 (new_name, old_name)", str(error))

    def test_theShippedFolder(self) -> None:
        """
        The package's own folder has no two files of one version, and no gap.
        """
        versions = [m.version for m in migrations()]
        self.assertEqual(versions, list(range(1, len(versions) + 1)))
