"""Captioned-image datasets: the four layouts, the report, and clear errors for files that do not parse."""

import io
import json
import zipfile

import pytest
from PIL import Image

from percept.captions import analyse_caption_dataset, read_caption_dataset, tokenize
from percept.datasets import DatasetAnalyzer, DatasetLimits, InvalidDataset, UnsafeZipPath
from percept.predictor import TrainingData

LIMITS = DatasetLimits()


def jpeg(colour: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (48, 32), colour).save(out, "JPEG")
    return out.getvalue()


def make_zip(members: dict[str, bytes | str]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data.encode() if isinstance(data, str) else data)
    return out.getvalue()


def flickr8k(token_lines: list[str], images: dict[str, bytes], splits: dict[str, list[str]]) -> bytes:
    """As the two official archives unpack, side by side under one folder."""
    members: dict[str, bytes | str] = {f"Flickr8k/Flicker8k_Dataset/{name}": data for name, data in images.items()}
    members["Flickr8k/text/Flickr8k.token.txt"] = "\n".join(token_lines) + "\n"
    for split, names in splits.items():
        members[f"Flickr8k/text/Flickr_8k.{split}Images.txt"] = "\n".join(names) + "\n"
    return make_zip(members)


RED, BLUE = jpeg((200, 20, 20)), jpeg((20, 20, 200))


def test_flickr8k_layout_report_and_images():
    tokens = [f"red.jpg#{k}\tA red square on grey ." for k in range(3)] + [
        "blue.jpg#0\ta blue square", "blue.jpg#1\tA BLUE box, small", "gone.jpg#0\ta missing photo"]
    archive = flickr8k(tokens, {"red.jpg": RED, "blue.jpg": BLUE, "extra.jpg": RED, "broken.jpg": b"not a jpeg"},
                       {"train": ["red.jpg"], "dev": ["blue.jpg"], "test": []})
    report = analyse_caption_dataset(archive, LIMITS, min_word_count=2)

    assert report["kind"] == "captions" and report["layout"] == "flickr8k"
    assert report["num_images"] == 2 and report["num_captions"] == 5
    assert report["captions_per_image"] == {"min": 2, "max": 3, "mean": 2.5}
    assert report["splits"] == {"dev": 1, "train": 1}
    assert report["missing_images"] == {"count": 1, "files": ["gone.jpg"]}
    assert report["uncaptioned_images"]["files"] == ["Flickr8k/Flicker8k_Dataset/broken.jpg",
                                                     "Flickr8k/Flicker8k_Dataset/extra.jpg"]
    # "a" (x5), "square" (x4), "red", "on" and "grey" (x3), "blue" (x2): seen at least twice
    assert report["vocabulary"]["size"] == 6 and report["vocabulary"]["min_word_count"] == 2
    assert report["caption_length"]["max"] == 5

    images = read_caption_dataset(archive, LIMITS)
    assert [(i.name.rsplit("/", 1)[-1], i.split, len(i.captions)) for i in images] == [
        ("blue.jpg", "dev", 2), ("red.jpg", "train", 3)]
    assert images[1].data == RED


def test_undecodable_captioned_images_are_reported():
    archive = flickr8k(["red.jpg#0\ta red one", "bad.jpg#0\ta broken one"], {"red.jpg": RED, "bad.jpg": b"\xff\xd8x"},
                       {})
    report = analyse_caption_dataset(archive, LIMITS)
    assert report["undecodable"] == {"count": 1, "files": ["Flickr8k/Flicker8k_Dataset/bad.jpg"]}
    assert report["num_images"] == 1 and report["splits"] == {"unassigned": 1}
    assert any("names no splits" in warning for warning in report["warnings"])


def test_coco_captions():
    document = {"images": [{"id": 1, "file_name": "COCO_train2014_1.jpg"},
                           {"id": 2, "file_name": "COCO_train2014_2.jpg"}],
                "annotations": [{"image_id": 1, "caption": "A red thing."}, {"image_id": 2, "caption": "A blue thing."},
                                {"image_id": 2, "caption": "Something blue."}]}
    archive = make_zip({"coco/annotations/captions_train2014.json": json.dumps(document),
                        "coco/train2014/COCO_train2014_1.jpg": RED, "coco/train2014/COCO_train2014_2.jpg": BLUE})
    report = analyse_caption_dataset(archive, LIMITS, min_word_count=1)
    assert report["layout"] == "coco" and report["num_captions"] == 3 and report["splits"] == {"train": 2}
    images = read_caption_dataset(archive, LIMITS)
    assert [i.captions for i in images] == [["A red thing."], ["A blue thing.", "Something blue."]]


def test_jsonl_and_csv_paths_are_relative_to_the_caption_file():
    jsonl = make_zip({"mine/captions.jsonl": json.dumps({"image": "pics/a.jpg", "captions": ["red"], "split": "test"})
                      + "\n\n" + json.dumps({"image": "pics/b.jpg", "captions": ["blue", "navy"]}) + "\n",
                      "mine/pics/a.jpg": RED, "mine/pics/b.jpg": BLUE})
    images = read_caption_dataset(jsonl, LIMITS)
    assert [(i.name, i.captions, i.split) for i in images] == [
        ("mine/pics/a.jpg", ["red"], "test"), ("mine/pics/b.jpg", ["blue", "navy"], None)]

    table = make_zip({"captions.csv": "image,caption,split\na.jpg,\"a red, red square\",train\na.jpg,red,train\n"
                                      "b.jpg,blue,dev\n", "a.jpg": RED, "b.jpg": BLUE})
    report = analyse_caption_dataset(table, LIMITS, min_word_count=1)
    assert report["layout"] == "csv" and report["num_captions"] == 3 and report["splits"] == {"dev": 1, "train": 1}


@pytest.mark.parametrize(("members", "file", "line"), [
    ({"Flickr8k.token.txt": "a.jpg#0\tfine\nb.jpg no tab here\n", "Flicker8k_Dataset/a.jpg": RED},
     "Flickr8k.token.txt", 2),
    ({"captions.jsonl": '{"image": "a.jpg", "captions": ["ok"]}\n{"image": "a.jpg", "captions": []}\n',
      "a.jpg": RED}, "captions.jsonl", 2),
    ({"captions.jsonl": '{"image": "a.jpg", "captions": ["ok"]}\n\n{not json\n', "a.jpg": RED}, "captions.jsonl", 3),
    ({"captions.csv": "image,caption\na.jpg,ok\nb.jpg,\n", "a.jpg": RED}, "captions.csv", 3),
    ({"captions.csv": "picture,text\na.jpg,ok\n", "a.jpg": RED}, "captions.csv", 1),
    ({"captions.jsonl": b'{"image": "a.jpg", "captions": ["ok"]}\n\xff\xfe\n', "a.jpg": RED}, "captions.jsonl", 2),
    # Found by tests/core/test_fuzz_inputs.py, each an uncaught exception before: a header row over the csv
    # module's field limit (csv.Error), JSON nested deeper than the stack (RecursionError).
    ({"captions.csv": "x" * 200_000 + ",image,caption\na.jpg,ok\n", "a.jpg": RED}, "captions.csv", 1),
    ({"captions.jsonl": '{"image": "a.jpg", "captions": ["ok"]}\n' + "[" * 100_000 + "]" * 100_000, "a.jpg": RED},
     "captions.jsonl", 2),
    ({"annotations/captions_train.json": "[" * 100_000 + "]" * 100_000, "a.jpg": RED},
     "annotations/captions_train.json", 1),
])
def test_a_caption_file_that_does_not_parse_names_its_file_and_line(members, file, line):
    with pytest.raises(InvalidDataset) as raised:
        analyse_caption_dataset(make_zip(members), LIMITS)
    error = raised.value
    assert error.code == "invalid_caption_file" and error.status == 422
    assert error.details == {"file": file, "line": line}
    assert f"{file!r}, line {line}" in error.message


def test_coco_without_its_keys_and_captions_without_images_are_refused():
    with pytest.raises(InvalidDataset) as raised:
        read_caption_dataset(make_zip({"annotations/captions_val.json": '{"images": []}'}), LIMITS)
    assert raised.value.code == "invalid_caption_file" and "annotations" in raised.value.message
    with pytest.raises(InvalidDataset) as raised:
        read_caption_dataset(make_zip({"captions.csv": "image,caption\nnowhere.jpg,a caption\n"}), LIMITS)
    assert raised.value.code == "no_captioned_images"


def test_a_coco_file_name_that_is_not_text_is_refused():
    """Found by tests/core/test_fuzz_inputs.py: a numeric `file_name` was an AttributeError in the analysis."""
    document = {"images": [{"id": 1, "file_name": 7}], "annotations": [{"image_id": 1, "caption": "a red square"}]}
    with pytest.raises(InvalidDataset) as raised:
        analyse_caption_dataset(make_zip({"annotations/captions_train.json": json.dumps(document), "a.jpg": RED}),
                                LIMITS)
    assert raised.value.code == "invalid_caption_file" and "file_name" in raised.value.message


def test_caption_zips_get_the_same_zip_safety():
    with pytest.raises(UnsafeZipPath):
        analyse_caption_dataset(make_zip({"captions.csv": "image,caption\na.jpg,x\n", "../a.jpg": RED}), LIMITS)


def test_the_analysis_job_tells_caption_datasets_from_class_folders():
    analyzer = DatasetAnalyzer()
    captions = make_zip({"captions.csv": "image,caption\na.jpg,a red square\n", "a.jpg": RED})
    classes = make_zip({"red/1.jpg": RED, "red/2.jpg": RED, "blue/1.jpg": BLUE, "blue/2.jpg": BLUE})
    on_step = lambda *_: None  # noqa: E731
    assert analyzer.train(TrainingData(captions, LIMITS), {}, on_step).output["report"]["kind"] == "captions"
    report = analyzer.train(TrainingData(classes, LIMITS), {}, on_step).output["report"]
    assert report["kind"] == "classes" and report["classes"] == {"blue": 2, "red": 2}


def test_tokenize():
    assert tokenize("A dog's ball, in 2 PARKS!") == ["a", "dog's", "ball", "in", "2", "parks"]
