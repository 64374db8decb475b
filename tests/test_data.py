import json

import numpy as np
import pytest
from PIL import Image

from dreambooth_dora.training.data import DataError, batch_indices, load_examples, load_image, to_training_tensor, step_rng


def save_odd_images(folder):
    """One file per kind of odd input a user's folder holds."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[:, :30] = (255, 0, 0)  # left half red
    Image.fromarray(rgb).save(folder / "rgb.png")
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., 2] = 255  # blue, fully transparent on the right half
    rgba[:, :20, 3] = 255
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    Image.fromarray(np.full((32, 32), 128, np.uint8), "L").save(folder / "gray.png")
    Image.fromarray(np.full((32, 32), 65535, np.uint16)).save(folder / "deep16.png")
    Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE).save(folder / "palette.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(rgb).save(folder / "rotated.jpg", exif=exif.tobytes())
    return folder


def test_odd_images_become_8bit_rgb(tmp_path):
    folder = save_odd_images(tmp_path / "imgs")
    rgba = load_image(folder / "rgba.png")
    assert rgba.mode == "RGB" and rgba.getpixel((5, 5)) == (0, 0, 255) and rgba.getpixel((35, 5)) == (255, 255, 255)
    assert load_image(folder / "gray.png").getpixel((0, 0)) == (128, 128, 128)
    assert load_image(folder / "deep16.png").getpixel((0, 0)) == (255, 255, 255)  # 16-bit white stays white
    assert load_image(folder / "palette.png").getpixel((0, 0))[0] > 200
    rotated = load_image(folder / "rotated.jpg")
    assert rotated.size == (40, 60)  # EXIF orientation applied: portrait now
    assert np.asarray(rotated)[:30, :, 0].mean() > 200  # the red half is on top after the 90 degree turn


def test_folder_with_bad_files_warns_by_name_and_keeps_the_rest(tmp_path):
    folder = save_odd_images(tmp_path / "imgs")
    (folder / "broken.png").write_bytes(b"not a png")
    Image.new("RGB", (4, 4)).save(folder / "tiny.png")
    with pytest.warns(UserWarning, match=r"skipped 2 .*broken.png.*tiny.png \(only 4x4 px\)"):
        examples = load_examples(str(folder), default_caption="a sks thing")
    assert len(examples) == 6 and all(ex.image.mode == "RGB" and ex.caption == "a sks thing" for ex in examples)


def huge_png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (the image data is a 1x1 picture's): what
    the image library refuses to decode as a possible decompression bomb."""
    import io
    import struct
    import zlib

    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = 8  # after the signature: length (4), b"IHDR" (4), width, height, ...
    data[ihdr + 8:ihdr + 16] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr + 4:ihdr + 8 + 13]))
    data[ihdr + 8 + 13:ihdr + 8 + 17] = struct.pack(">I", crc)
    return bytes(data)


def test_images_too_large_to_decode_are_skipped_by_name(tmp_path):
    folder = save_odd_images(tmp_path / "imgs")
    (folder / "bomb.png").write_bytes(huge_png_header(30000, 30000))  # 900 M pixels
    with pytest.raises(Image.DecompressionBombError):
        Image.open(folder / "bomb.png")
    with pytest.warns(UserWarning, match=r"skipped 1 .*bomb.png \(too large to decode"):
        examples = load_examples(str(folder), default_caption="x")
    assert len(examples) == 6


def test_folders_with_nothing_usable_fail_clearly(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_examples(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match="holds no images"):
        load_examples(str(tmp_path / "empty"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_bytes(b"junk")
    with pytest.raises(DataError, match=r"no usable images .*a.png"):
        load_examples(str(tmp_path / "bad"))


def test_captions_from_metadata_and_local_datasets(tmp_path, icon_dir):
    examples = load_examples(str(icon_dir), caption_column="text", default_caption="unused")
    assert len(examples) == 6 and {ex.caption for ex in examples} == {"a sks icon, 3d render"}
    # a dataset folder given as dataset_name, with its own column names
    folder = tmp_path / "ds"
    folder.mkdir()
    rows = []
    for i, colour in enumerate(["red", "green"]):
        Image.new("RGB", (32, 32), colour).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "prompt": f"a {colour} sks cube"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = load_examples(dataset_name=str(folder), caption_column="prompt")
    assert sorted(ex.caption for ex in examples) == ["a green sks cube", "a red sks cube"]
    with pytest.raises(DataError, match="no caption column 'text'; columns: image, prompt"):
        load_examples(dataset_name=str(folder), caption_column="text")
    with pytest.raises(DataError, match="cannot load dataset 'nobody/no-such-dataset'"):
        load_examples(dataset_name="nobody/no-such-dataset")


def test_crop_and_flip():
    im = Image.new("RGB", (200, 100), "black")
    im.paste((255, 255, 255), (0, 0, 100, 100))  # left half white
    t = to_training_tensor(im, 64, True, False, step_rng(0, 0))
    assert t.shape == (3, 64, 64) and t.min() >= -1 and t.max() <= 1
    assert t[:, :, :32].mean() > 0.9 and t[:, :, 32:].mean() < -0.9  # center crop straddles the edge
    flipped = to_training_tensor(im, 64, True, True, step_rng(0, 0))
    assert flipped[:, :, :32].mean() < -0.9
    crops = {tuple(to_training_tensor(im, 64, False, False, step_rng(0, k)).mean(dim=(0, 1)).sign().tolist()[::16])
             for k in range(8)}
    assert len(crops) > 1  # random crops move


def test_batches_cover_each_epoch_and_split_across_processes():
    n, seed = 7, 3
    seen = [i for k in range(7) for i in batch_indices(n, 2, k, seed)]  # 14 = two epochs
    assert sorted(seen[:7]) == list(range(7)) and sorted(seen[7:]) == list(range(7))
    assert seen[:7] != list(range(7))  # shuffled
    # two processes with batch 2 take the two halves of the global batch of 4
    assert batch_indices(n, 4, 5, seed) == batch_indices(n, 4, 5, seed)
    assert batch_indices(n, 4, 0, seed)[:2] + batch_indices(n, 4, 0, seed)[2:] == batch_indices(n, 4, 0, seed)


def test_batch_maker_from_settings_takes_every_data_setting():
    """The run's batch maker reads its data settings from the TrainConfig; each one lands in the
    field the batches use (a setting mapped to the wrong field would change what is trained)."""
    from dreambooth_dora.training.config import load_config
    import torch

    from dreambooth_dora.training.data import BatchMaker

    cfg = load_config(["--instance_data_dir", "sample_data/3d_icon", "--instance_prompt", "a sks icon", "--seed", "9",
                       "--train_batch_size", "3", "--resolution", "48", "--center_crop", "--random_flip",
                       "--caption_dropout_rate", "0.25", "--masked_loss", "--output_dir", "/tmp/unused"])
    draw = object()
    maker = BatchMaker.from_settings(cfg, [], [], [0], num_processes=2, process_index=1, draw=draw, vae=None,
                                     latent_cache=None, device="cpu", dtype=torch.float16, buckets=None)
    assert (maker.seed, maker.batch_size, maker.resolution, maker.center_crop, maker.random_flip,
            maker.caption_dropout_rate, maker.masked) == (9, 3, 48, True, True, 0.25, True)
    assert (maker.num_processes, maker.process_index, maker.draw, maker.dtype) == (2, 1, draw, torch.float16)


def test_a_caption_file_that_leaves_pictures_out_or_is_empty_stops_in_one_line(tmp_path):
    """`datasets` would drop the pictures metadata.jsonl leaves out without a word (and fails with
    'list index out of range' on an empty one): both are one DataError naming the file."""
    folder = tmp_path / "set"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (80 * i, 0, 0)).save(folder / f"{i}.png")
    meta = folder / "metadata.jsonl"
    meta.write_text("")
    with pytest.raises(DataError, match="metadata.jsonl' is empty"):
        load_examples(str(folder), caption_column="text")
    meta.write_text(json.dumps({"file_name": "0.png", "text": "a sks cube"}) + "\n")
    with pytest.raises(DataError, match=r"no line for 2 picture\(s\) beside it, which would not train: 1.png, 2.png"):
        load_examples(str(folder), caption_column="text")
    meta.write_text("".join(json.dumps({"file_name": f"{i}.png", "text": f"cube {i}"}) + "\n" for i in range(3)))
    assert sorted(e.caption for e in load_examples(str(folder), caption_column="text")) == ["cube 0", "cube 1", "cube 2"]


def test_colour_pictures_given_as_masks_are_warned_about(tmp_path):
    folder, masks = tmp_path / "set", tmp_path / "masks"
    folder.mkdir(), masks.mkdir()
    for i in range(2):
        Image.new("RGB", (32, 32), (200, 40, 40)).save(folder / f"{i}.png")
    Image.new("L", (32, 32), 255).save(masks / "0.png")  # a mask
    picture = Image.new("RGB", (32, 32), (255, 255, 255))
    picture.paste((30, 120, 220), (0, 0, 16, 32))  # half blue: a colour picture, not a mask
    picture.save(masks / "1.png")
    with pytest.warns(UserWarning, match=r"1 mask\(s\) .* are colour pictures, not masks .*: 1.png"):
        load_examples(str(folder), masked=True, mask_data_dir=str(masks))
    picture.convert("L").save(masks / "1.png")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_examples(str(folder), masked=True, mask_data_dir=str(masks))
