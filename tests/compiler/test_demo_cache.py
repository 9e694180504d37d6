"""The demo's artifact cache key follows the compiler's code, not only its version."""

from secformer_compiler.demo import _package_dirs, source_digest


def test_source_digest_follows_every_python_file(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    (a / "sub").mkdir(parents=True)
    b.mkdir()
    (a / "x.py").write_text("x = 1\n")
    (a / "sub" / "y.py").write_text("y = 2\n")
    (b / "z.py").write_text("z = 3\n")
    (a / "notes.txt").write_text("not code")
    d0 = source_digest([a, b])
    assert d0 == source_digest([b, a]) and len(d0) == 16
    (a / "notes.txt").write_text("still not code")
    assert source_digest([a, b]) == d0
    (a / "sub" / "y.py").write_text("y = 3\n")  # an edit deep in a package
    d1 = source_digest([a, b])
    assert d1 != d0
    (a / "sub" / "y.py").rename(a / "sub" / "w.py")  # a rename with the same contents
    assert source_digest([a, b]) not in (d0, d1)


def test_package_dirs_cover_the_passes_and_the_runtime():
    names = {p.name for p in _package_dirs()}
    assert {"passes", "runtime"} <= names and len(source_digest(_package_dirs())) == 16
