"""The group commit: files durable together, all or nothing per job, dependencies honoured."""

import asyncio
import os
import stat

import pytest

from yuubin.durable import FileAccess, FileWrite, GroupCommitter


async def test_jobs_of_one_loop_turn_share_a_batch(tmp_path):
    gc = GroupCommitter(workers=1)
    try:
        jobs = [gc.enqueue([FileWrite(tmp_path / f"f{i}", b"x" * i)]) for i in range(10)]
        await asyncio.gather(*jobs)
        assert gc.batches == 1 and gc.jobs == 10
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"f{i}" for i in range(10))
    finally:
        gc.shutdown()


async def test_a_job_after_a_failed_one_fails_and_leaves_nothing(tmp_path):
    gc = GroupCommitter()
    try:
        # The first job's rename fails (its target directory does not exist) after its write.
        spool = gc.enqueue([FileWrite(tmp_path / "entry.tmp", b"message", rename_to=tmp_path / "no" / "entry")])
        copy = gc.enqueue([FileWrite(tmp_path / "copy.tmp", b"message", rename_to=tmp_path / "copy")],
                          unlinks=[tmp_path / "keep"], after=spool)
        (tmp_path / "keep").write_bytes(b"")
        with pytest.raises(FileNotFoundError):
            await spool
        with pytest.raises(FileNotFoundError):
            await copy
        assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]  # no copy, and no unlink either
    finally:
        gc.shutdown()


async def test_unlinks_follow_durable_writes(tmp_path):
    gc = GroupCommitter()
    try:
        (tmp_path / "spool-entry").write_bytes(b"m")
        os.mkdir(tmp_path / "new")
        await gc.enqueue([FileWrite(tmp_path / "t", b"m", rename_to=tmp_path / "new" / "t")],
                         unlinks=[tmp_path / "spool-entry"])
        assert not (tmp_path / "spool-entry").exists()
        assert (tmp_path / "new" / "t").read_bytes() == b"m"
    finally:
        gc.shutdown()


async def test_a_file_that_cannot_be_created_fails_at_once(tmp_path):
    gc = GroupCommitter()
    try:
        with pytest.raises(FileNotFoundError):
            gc.enqueue([FileWrite(tmp_path / "missing-dir" / "f", b"m")])
    finally:
        gc.shutdown()


async def test_a_file_gets_its_access_exactly_whatever_the_umask(tmp_path):
    gc = GroupCommitter()
    old = os.umask(0o077)  # would take the group's read bit away
    try:
        await gc.enqueue([FileWrite(tmp_path / "shared", b"m", access=FileAccess(0o640)),
                          FileWrite(tmp_path / "private", b"m")])
        os.umask(0)  # would leave the default open to everyone
        await gc.enqueue([FileWrite(tmp_path / "private2", b"m")])
    finally:
        os.umask(old)
        gc.shutdown()
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {"shared": 0o640, "private": 0o600, "private2": 0o600}


def test_directories_get_search_where_files_are_readable(tmp_path):
    assert (FileAccess().dir_mode, FileAccess(0o640).dir_mode, FileAccess(0o660).dir_mode) == (0o700, 0o750, 0o770)
    old = os.umask(0o077)
    try:
        created = FileAccess(0o640).make_dirs(tmp_path / "a" / "b")
    finally:
        os.umask(old)
    assert created == [tmp_path / "a", tmp_path / "a" / "b"]
    assert [stat.S_IMODE(d.stat().st_mode) for d in created] == [0o750, 0o750]
