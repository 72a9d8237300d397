"""Dataset zips: safe intake (zip-slip, bombs, links, encryption) and the analysis report."""

import random
import struct
import zipfile
from io import BytesIO

import pytest
from PIL import Image, ImageDraw, ImageEnhance

from percept.datasets import (
    NEAR_DUPLICATE_MAX_DISTANCE,
    DatasetLimits,
    _near_components,
    analyse_dataset,
    dhash,
    iter_dataset,
)
from percept.errors import PerceptError

LIMITS = DatasetLimits()


def pattern(seed: int, size: tuple[int, int] = (96, 72)) -> Image.Image:
    """Overlapping ellipses on a background: distinct seeds give dHashes far apart (solid colours all hash to 0)."""
    rng = random.Random(seed)
    image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    width, height = size
    for _ in range(6):
        x, y = rng.randrange(width), rng.randrange(height)
        draw.ellipse([x - width // 4, y - height // 4, x + width // 4, y + height // 4],
                     fill=tuple(rng.randrange(40, 216) for _ in range(3)))
    return image


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    out = BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def png(seed: int, size: tuple[int, int] = (96, 72)) -> bytes:
    return encode(pattern(seed, size))


def make_zip(members: list[tuple[str | zipfile.ZipInfo, bytes]]) -> bytes:
    out = BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members:
            archive.writestr(name, data)
    return out.getvalue()


def good_members() -> list[tuple[str, bytes]]:
    return ([(f"cats/{i}.png", png(i)) for i in range(3)]
            + [(f"dogs/{i}.png", png(10 + i, (64, 48))) for i in range(2)]
            + [(f"birds/{i}.png", png(20 + i, (80, 60))) for i in range(5)])


def refused(zip_bytes: bytes, code: str, status: int, limits: DatasetLimits = LIMITS) -> PerceptError:
    with pytest.raises(PerceptError) as caught:
        analyse_dataset(zip_bytes, limits)
    assert (caught.value.code, caught.value.status) == (code, status), caught.value.message
    return caught.value


def test_good_dataset_counts_and_sizes():
    report = analyse_dataset(make_zip(good_members()), LIMITS)

    assert report["classes"] == {"birds": 5, "cats": 3, "dogs": 2}
    assert (report["num_classes"], report["num_images"]) == (3, 10)
    assert report["undecodable"] == {"count": 0, "files": [], "by_class": {}}
    assert report["image_sizes"] == {
        "width": {"min": 64, "max": 96, "mean": (3 * 96 + 2 * 64 + 5 * 80) / 10},
        "height": {"min": 48, "max": 72, "mean": (3 * 72 + 2 * 48 + 5 * 60) / 10},
    }
    assert report["duplicates"] == {"exact": [], "near": [], "cross_class": [], "exact_count": 0, "near_count": 0}
    assert any("'dogs' has only 2 images" in warning for warning in report["warnings"])
    assert not any("'birds'" in warning for warning in report["warnings"])


def test_iter_dataset_yields_sorted_entries_with_labels_and_bytes():
    members = good_members()
    entries = list(iter_dataset(make_zip(list(reversed(members))), LIMITS))

    assert [entry.path for entry in entries] == sorted(name for name, _ in members)
    assert {(entry.path, entry.label, entry.data) for entry in entries} == {
        (name, name.split("/")[0], data) for name, data in members}


def test_single_wrapper_folder_is_accepted():
    members = [(f"mydata/{name}", data) for name, data in good_members()]
    report = analyse_dataset(make_zip(members), LIMITS)

    assert report["classes"] == {"birds": 5, "cats": 3, "dogs": 2}
    assert [entry.path for entry in iter_dataset(make_zip(members), LIMITS)][0] == "mydata/birds/0.png"


def test_macos_metadata_hidden_files_and_folders_are_ignored():
    members = [*good_members(),
               ("__MACOSX/cats/._0.png", b"\x00\x05\x16\x07 AppleDouble"),
               ("cats/.DS_Store", b"Bud1 not an image"),
               (".DS_Store", b"Bud1"),
               ("dogs/Thumbs.db", b"not an image"),
               (zipfile.ZipInfo("cats/"), b""),
               (zipfile.ZipInfo("__MACOSX/"), b"")]
    report = analyse_dataset(make_zip(members), LIMITS)

    assert report["classes"] == {"birds": 5, "cats": 3, "dogs": 2}
    assert report["undecodable"]["count"] == 0
    assert not any("top level" in warning for warning in report["warnings"])


def test_files_at_the_top_level_are_ignored_with_a_warning():
    report = analyse_dataset(make_zip([*good_members(), ("README.md", b"my dataset"), ("cover.png", png(99))]), LIMITS)

    assert report["num_images"] == 10
    assert report["undecodable"]["count"] == 0
    assert any("2 files at the top level" in warning and "ignored" in warning for warning in report["warnings"])


@pytest.mark.parametrize("name", ["../evil.png", "/abs.png", "..\\evil.png", "cats/../../evil.png",
                                  "C:/evil.png", "c:evil.png", "\\\\server\\share\\evil.png"])
def test_paths_escaping_the_archive_are_refused(name):
    zip_bytes = make_zip([*good_members(), (name, png(50))])

    error = refused(zip_bytes, "unsafe_zip_path", 422)
    assert repr(name) in error.message
    # Refused when the iterator is made, before the caller reads a single entry.
    with pytest.raises(PerceptError, match="unsafe path"):
        iter_dataset(zip_bytes, LIMITS)


def test_symlink_members_are_refused():
    link = zipfile.ZipInfo("cats/link.png")
    link.create_system = 3  # Unix: the mode lives in the high 16 bits of external_attr
    link.external_attr = 0o120777 << 16
    refused(make_zip([*good_members(), (link, b"/etc/passwd")]), "unsafe_zip_path", 422)


def test_encrypted_members_are_refused():
    zip_bytes = bytearray(make_zip(good_members()))
    record = zip_bytes.index(b"PK\x01\x02")  # the first central-directory record; its flags are at +8
    zip_bytes[record + 8] |= 0x1
    refused(bytes(zip_bytes), "encrypted_zip", 422)


def test_zip_bomb_is_refused_from_declared_sizes_without_inflating(monkeypatch):
    out = BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in good_members():
            archive.writestr(name, data)
        with archive.open("cats/bomb.png", "w") as member:
            zeros = bytes(1024 * 1024)
            for _ in range(100):  # 100 MB of zeros deflate to ~100 KB, streamed 1 MB at a time
                member.write(zeros)
    zip_bytes = out.getvalue()
    assert len(zip_bytes) < 1024 * 1024

    def no_inflating(*args, **kwargs):
        raise AssertionError("a member was opened before the declared sizes were checked")

    monkeypatch.setattr(zipfile.ZipFile, "open", no_inflating)
    error = refused(zip_bytes, "zip_too_large", 413)
    assert "cats/bomb.png" in error.message and "zip bomb" in error.message


def test_total_declared_size_over_the_cap_is_refused():
    incompressible = random.Random(0).randbytes(600 * 1024)
    members = [*good_members(), ("cats/big.bmp", incompressible), ("dogs/big.bmp", incompressible)]
    limits = DatasetLimits(max_uncompressed_bytes=1024 * 1024)

    error = refused(make_zip(members), "zip_too_large", 413, limits)
    assert "unpack to more than 1 MB" in error.message


def test_member_larger_than_any_image_under_the_pixel_cap_is_refused():
    members = [*good_members(), ("cats/huge.bmp", random.Random(0).randbytes(1200 * 1024))]
    limits = DatasetLimits(max_image_pixels=20_000)  # 20k pixels * 4 bytes + 1 MiB of headers < 1.2 MB

    error = refused(make_zip(members), "zip_too_large", 413, limits)
    assert "cats/huge.bmp" in error.message


def test_too_many_files_are_refused():
    limits = DatasetLimits(max_files=9)
    refused(make_zip(good_members()), "zip_too_large", 413, limits)
    assert analyse_dataset(make_zip(good_members()), DatasetLimits(max_files=10))["num_images"] == 10


def test_too_many_entries_are_refused_before_the_directory_is_parsed():
    members = [("cats/0.png", png(0)), ("dogs/0.png", png(1))] + [(f"cats/.junk{i}", b"") for i in range(5)]
    limits = DatasetLimits(max_files=2)  # up to 3 entries per file may be folders and macOS metadata

    refused(make_zip(members), "zip_too_large", 413, limits)
    assert analyse_dataset(make_zip(members[:6]), limits)["num_images"] == 2


def test_zip_over_the_byte_limit_is_refused():
    zip_bytes = make_zip(good_members())
    refused(zip_bytes, "zip_too_large", 413, DatasetLimits(max_zip_bytes=len(zip_bytes) - 1))


def test_header_understating_a_members_size_cannot_inflate_it():
    zip_bytes = bytearray(make_zip([*good_members(), ("cats/liar.png", bytes(500 * 1024))]))
    record = zip_bytes.rindex(b"PK\x01\x02")  # the last member's central-directory record
    zip_bytes[record + 24:record + 28] = struct.pack("<I", 1000)  # declared uncompressed size

    error = refused(bytes(zip_bytes), "not_a_zip", 415)
    assert "cats/liar.png" in error.message


@pytest.mark.parametrize("data", [b"", b"hello, not a zip", png(0), make_zip(good_members())[:2000]],
                         ids=["empty", "text", "png", "truncated"])
def test_not_a_zip_is_refused(data):
    error = refused(data, "not_a_zip", 415)
    assert "zip" in error.message


def test_a_single_class_is_refused():
    refused(make_zip([(f"cats/{i}.png", png(i)) for i in range(3)]), "too_few_classes", 422)
    # Two folders, but only one has a readable image.
    error = refused(make_zip([("cats/0.png", png(0)), ("dogs/0.png", b"not an image")]), "too_few_classes", 422)
    assert "'cats'" in error.message


def test_zero_images_is_refused():
    refused(make_zip([("README.md", b"nothing here"), (zipfile.ZipInfo("cats/"), b"")]), "empty_dataset", 422)
    refused(make_zip([("cats/0.png", b"junk"), ("dogs/0.png", b"junk")]), "empty_dataset", 422)


def test_corrupt_files_are_counted_as_undecodable_and_the_rest_is_analysed():
    truncated = png(40)[:200]
    members = [*good_members(), ("cats/broken.png", truncated), ("dogs/notes.txt", b"a note"),
               ("dogs/empty.jpg", b"")]
    report = analyse_dataset(make_zip(members), LIMITS)

    assert report["classes"] == {"birds": 5, "cats": 3, "dogs": 2}
    assert report["undecodable"] == {"count": 3, "files": ["cats/broken.png", "dogs/empty.jpg", "dogs/notes.txt"],
                                     "by_class": {"cats": 1, "dogs": 2}}
    assert any("3 files could not be read" in warning for warning in report["warnings"])


def test_decompression_bomb_image_counts_as_undecodable():
    bomb = encode(Image.new("L", (3000, 3000)))  # 9 MP of one colour: a few KB of PNG
    limits = DatasetLimits(max_image_pixels=1_000_000)
    report = analyse_dataset(make_zip([*good_members(), ("cats/bomb.png", bomb)]), limits)

    assert report["undecodable"]["files"] == ["cats/bomb.png"]
    assert report["num_images"] == 10


def test_exact_duplicates_within_and_across_classes_are_reported():
    members = [*good_members(), ("cats/0-copy.png", png(0)), ("dogs/stolen-cat.png", png(1))]
    report = analyse_dataset(make_zip(members), LIMITS)
    duplicates = report["duplicates"]

    assert duplicates["exact"] == [["cats/0-copy.png", "cats/0.png"], ["cats/1.png", "dogs/stolen-cat.png"]]
    assert duplicates["cross_class"] == [["cats/1.png", "dogs/stolen-cat.png"]]
    assert (duplicates["exact_count"], duplicates["near_count"], duplicates["near"]) == (2, 0, [])
    assert any("2 images appear under more than one class" in warning for warning in report["warnings"])


def test_reencoded_or_brightened_copy_is_a_near_duplicate():
    jpeg = encode(pattern(2), "JPEG", quality=85)
    brighter = encode(ImageEnhance.Brightness(pattern(20, (80, 60))).enhance(1.05))
    members = [*good_members(), ("cats/2-small.jpg", jpeg), ("birds/0-bright.png", brighter)]
    report = analyse_dataset(make_zip(members), LIMITS)
    duplicates = report["duplicates"]

    assert duplicates["near"] == [["birds/0-bright.png", "birds/0.png"], ["cats/2-small.jpg", "cats/2.png"]]
    assert (duplicates["exact"], duplicates["cross_class"], duplicates["near_count"]) == ([], [], 2)
    assert any("2 images look nearly identical" in warning for warning in report["warnings"])


def test_dhash_survives_small_edits_and_separates_different_images():
    original = pattern(5)
    jpeg = Image.open(BytesIO(encode(original, "JPEG", quality=85)))
    brighter = ImageEnhance.Brightness(original).enhance(1.05)

    assert (dhash(original) ^ dhash(jpeg)).bit_count() <= NEAR_DUPLICATE_MAX_DISTANCE
    assert (dhash(original) ^ dhash(brighter)).bit_count() <= NEAR_DUPLICATE_MAX_DISTANCE
    assert (dhash(original) ^ dhash(pattern(6))).bit_count() > NEAR_DUPLICATE_MAX_DISTANCE
    assert dhash(Image.new("RGB", (50, 50), "red")) == 0
    assert dhash(Image.linear_gradient("L").rotate(-90)) == (1 << 64) - 1  # lighter on the left everywhere
    assert dhash(Image.linear_gradient("L").rotate(90)) == 0


def test_banded_near_matching_finds_exactly_the_pairwise_components():
    rng = random.Random(7)
    hashes = [rng.getrandbits(64) for _ in range(400)]
    for source in rng.sample(range(400), 80):  # plant variants 1-9 bits away, some chaining
        flipped = hashes[source]
        for bit in rng.sample(range(64), rng.randint(1, 9)):
            flipped ^= 1 << bit
        hashes.append(flipped)
    hashes += hashes[:5]  # identical hashes too

    parent = list(range(len(hashes)))

    def root(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for i in range(len(hashes)):
        for j in range(i + 1, len(hashes)):
            if (hashes[i] ^ hashes[j]).bit_count() <= NEAR_DUPLICATE_MAX_DISTANCE:
                parent[root(j)] = root(i)
    expected: dict[int, set[int]] = {}
    for i in range(len(hashes)):
        expected.setdefault(root(i), set()).add(i)

    found = {frozenset(group) for group in _near_components(hashes)}
    assert found == {frozenset(group) for group in expected.values() if len(group) > 1}
    assert len(found) > 40
