"""Writes the tiny VLMEvalKit-format TSVs next to this file (committed; rerun
after changing them): real base64 PNGs drawn with PIL, 56 x 56 pixels (the
processor's minimum, 4 image tokens), columns as the benchmarks ship them."""

import base64
import csv
import io
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent


def png(color, shape="box"):
    im = Image.new("RGB", (56, 56), "white")
    d = ImageDraw.Draw(im)
    if shape == "box":
        d.rectangle([8, 8, 47, 47], fill=color)
    elif shape == "bars":
        for i, h in enumerate((20, 35, 50)):
            d.rectangle([6 + 16 * i, 56 - h, 16 + 16 * i, 55], fill=color)
    else:
        d.text((4, 20), shape, fill=color)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def write(name, columns, rows):
    with (HERE / name).open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(columns)
        w.writerows(rows)


# AI2D_TEST: 4 options (one question with 3: D empty); row 3 stores its image as row 1's index.
write("ai2d.tsv", ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"], [
    [0, "What colour is the box?", "", "blue", "green", "red", "black", "C", "colours", png("red")],
    [1, "Which stage comes first?", "A life cycle.", "egg", "larva", "adult", "", "A", "life cycles", png("green", "bars")],
    [2, "What shape is drawn?", "", "circle", "square", "line", "none", "B", "colours", "0"],
])
# MMMU_DEV_VAL: a two-image question (list of base64), and an open question without options.
write("mmmu.tsv", ["index", "question", "A", "B", "C", "D", "answer", "category", "split", "image"], [
    ["validation_Art_1", "<image 1> and <image 2>: which is darker?", "the first", "the second", "", "", "A", "Art", "validation",
     repr([png("black"), png("yellow")])],
    ["validation_Math_2", "How many bars are there?", "", "", "", "", "3", "Math", "validation", png("blue", "bars")],
])
# ChartQA_TEST: numeric, percentage and text answers.
write("chartqa.tsv", ["index", "question", "answer", "split", "image"], [
    [0, "What is the value of the highest bar?", "50", "human", png("blue", "bars")],
    [1, "What share does the first bar have?", "20%", "augmented", png("red", "bars")],
    [2, "Which colour are the bars?", "Blue", "human", png("blue", "bars")],
])
# DocVQA_VAL: answers as a list literal of accepted strings.
write("docvqa.tsv", ["index", "question", "answer", "image"], [
    [0, "What is the title?", repr(["Invoice", "invoice no. 1"]), png("black", "Invoice")],
    [1, "What is the date?", repr(["1 May"]), png("black", "1 May")],
    [2, "What code is printed?", repr(["C%0", "C-0"]), png("black", "C%0")],
])
