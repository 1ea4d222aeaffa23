"""The sample crawl's cases: a builder of pages and the images they link, and the cases that make up the crawl."""

from __future__ import annotations

import base64
import hashlib
import io
import struct
import zlib
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

_SEED = 20260115

# Captions are assembled from these parts; subjects come paired with an action that suits them so
# every caption reads as a plausible description (later stages look for nouns and real words).
_TIMES = ["清晨", "傍晚", "雨后", "初春", "深秋", "冬日", "夏夜", "午后", "黄昏", "周末"]
_PLACES = [
    "西湖边", "黄山脚下", "漓江上", "苏州园林里", "古镇石桥旁", "青海湖畔", "乡间小路上",
    "老街巷口", "海边礁石上", "山间茶园里", "城市公园里", "江南水乡", "草原深处", "竹林小径上",
]
_DOINGS = [
    ("一只橘猫", "安静地趴在窗台上晒太阳"),
    ("几只白鹭", "缓缓掠过平静的水面"),
    ("一位老人", "坐在长椅上翻看报纸"),
    ("孩子们", "追逐着彩色的风筝奔跑"),
    ("一艘渔船", "随着波浪轻轻摇晃"),
    ("一位摄影师", "举着相机记录眼前的风景"),
    ("几位茶农", "弯腰采摘新鲜的嫩芽"),
    ("一对父女", "沿着河岸慢慢散步"),
    ("一头水牛", "在田埂边低头吃草"),
    ("一群麻雀", "停在屋檐下躲雨"),
    ("两只小狗", "在草地上打滚嬉戏"),
    ("一位画家", "支起画架描绘远处的村庄"),
]
_SCENES = [
    "远处的山峦笼罩在薄雾之中",
    "金色的阳光洒满整个画面",
    "岸边的柳树刚刚抽出新芽",
    "天空中飘着几朵洁白的云",
    "空气里弥漫着桂花的香气",
    "红色的灯笼挂满了街道两旁",
    "路边的油菜花开得正盛",
    "湖面倒映着晚霞的颜色",
]

# Hand-written Traditional captions: the script is the point of the case, so they are not converted.
_HANT_CAPTIONS = [
    "清晨的湖邊，幾隻白鷺在淺灘上低頭覓食，遠處的山巒籠罩在薄霧之中",
    "傍晚的老街巷口，紅色的燈籠掛滿了街道兩旁，行人慢慢走過石板路",
    "一碗熱氣騰騰的牛肉麵，湯頭清亮，上面撒著翠綠的蔥花和香菜",
    "秋天的銀杏樹下鋪滿了金黃色的落葉，孩子們在樹下開心地奔跑",
    "雨後的竹林小徑，空氣清新濕潤，石階上長滿了青苔",
]
_HANT_TEXT = [
    "這個週末我們沿著河岸走了一整天，看到了許多美麗的風景。",
    "老街上的小店大多是幾代人經營的，每一家都有自己的故事。",
    "傍晚時分，湖面上的光線變得柔和，很適合拍照留念。",
]

_ZH_TEXT = [
    "这个周末我们沿着河岸走了一整天，沿途看到了许多美丽的风景。",
    "老街上的小店大多由几代人经营，每一家都有自己的故事和招牌菜。",
    "傍晚时分，湖面上的光线变得柔和，很多人带着相机来这里拍照。",
    "春天的茶园一片新绿，茶农们清早就上山采茶，一直忙到中午。",
    "古镇保留了明清时期的建筑风格，青石板路两旁是白墙黑瓦的民居。",
    "草原上的夏天很短，七月的野花开满山坡，牛羊在远处悠闲地吃草。",
    "雨后的空气格外清新，路边的树叶上还挂着晶莹的水珠。",
    "本文记录了一次三天两夜的短途旅行，附上沿途拍摄的照片和简单的路线说明。",
    "当地的早餐种类丰富，米粉、豆浆和油条都很受欢迎，价格也很实惠。",
    "我们在渡口等了半个小时，终于坐上了开往对岸的小船。",
    "博物馆里陈列着大量出土的陶器和青铜器，讲解员介绍得非常详细。",
    "山顶的日出需要耐心等待，太阳跃出云海的那一刻，所有人都安静了下来。",
]
_ZH_TITLES = [
    "西湖三日游记", "古镇慢生活", "春日茶园见闻", "黄山影像集", "江南早餐地图", "草原七月",
    "雨后的小城", "渡口的清晨", "博物馆半日", "山顶看日出", "老街的味道", "周末短途旅行",
]
_EN_TEXT = [
    "We spent the whole weekend walking along the river and taking photos of the old town.",
    "The market opens early in the morning, and most stalls sell fresh vegetables and bread.",
    "This guide lists a few quiet places for a short trip, with a simple map of each route.",
    "The museum keeps a small collection of pottery, and the staff explain every piece with care.",
]
_EN_ALTS = [
    "Morning mist over the lake with two white herons",
    "A small boat tied to a wooden pier at sunset",
    "Fresh bread and vegetables on a market stall",
]
_JA_TEXT = [
    "週末は川沿いを一日中歩いて、古い町並みの写真をたくさん撮りました。",
    "朝早くから市場が開いていて、新鮮な野菜やパンを売るお店が並んでいます。",
    "山の上で日の出を待つ時間は長かったですが、とても美しい景色でした。",
]
_JA_ALTS = [
    "京都の古いお寺と紅葉がとてもきれいです",
    "朝の市場で売られている新鮮な野菜です",
    "川沿いの道をゆっくり散歩しました",
]


@dataclass
class Blob:
    """What the crawl serves at one image URL."""

    url: str
    body: bytes
    content_type: str
    status: int = 200
    warc: int | None = None  # None: the file of the first page that links it
    headers: tuple[tuple[str, str], ...] = ()  # more HTTP response headers (e.g. X-Robots-Tag)
    standalone: bool = False  # written to its file though no page links it (e.g. a robots.txt)


@dataclass
class Img:
    src: str | None
    alt_html: str | None  # the attribute as written in the HTML source; None: no alt attribute
    expected: str
    case: str
    upper: bool = False  # spell the tag <IMG SRC=.. ALT=..>
    extra: tuple[tuple[str, str], ...] = ()  # more attributes, written after src and alt
    fetch_src: str | None = None  # the attribute value the extractor should take when it is not src
    resolved: bool = True  # False: dropped before its URL is resolved (the key is then of the raw value)

    @property
    def taken(self) -> str | None:
        return self.fetch_src or self.src


@dataclass
class Page:
    url: str
    warc: int
    case: str
    selected: bool
    imgs: list[Img]
    paragraphs: list[str]
    title: str
    charset: str = "utf-8"  # the codec the body is written in
    charset_label: str = "UTF-8"  # what the HTTP header, <meta> and charset-detected say
    languages: list[tuple[str, str, str, float]] | None = None  # cld2 (code, iso3, name, covered); None: no record
    html_lang: str = "zh-CN"
    base_href: str | None = None
    trailer: str = ""  # raw HTML appended to the article

    @property
    def ip(self) -> str:
        # TEST-NET-1 (RFC 5737): documentation addresses, one per host like a real crawl's DNS answers.
        return f"192.0.2.{1 + int(hashlib.sha1(urlsplit(self.url).netloc.encode()).hexdigest(), 16) % 250}"


def _caption(i: int) -> str:
    # Coprime strides keep captions distinct for the first few hundred indices.
    who, doing = _DOINGS[i % len(_DOINGS)]
    place = _PLACES[(5 * i + 1) % len(_PLACES)]
    time = _TIMES[(3 * i + 2) % len(_TIMES)]
    scene = _SCENES[(7 * i + 3) % len(_SCENES)]
    return f"{time}的{place}，{who}{doing}，{scene}"


def _texture(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    # Low-frequency structure (a coarse colour grid plus a few shapes) makes each image distinct at
    # 16x16 thumbnail scale; grain sized to a 256 px frame plus pixel noise keeps the blur, texture
    # and entropy filters passing whatever resolution they are computed at.
    gw, gh = (int(v) for v in rng.integers(3, 7, size=2))
    coarse = rng.integers(15, 240, size=(gh, gw, 3)).astype(np.uint8)
    base = Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(base)
    for _ in range(int(rng.integers(4, 9))):
        x0, y0 = int(rng.integers(-w // 4, w)), int(rng.integers(-h // 4, h))
        x1, y1 = x0 + int(rng.integers(w // 8, w // 2)), y0 + int(rng.integers(h // 8, h // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        if rng.random() < 0.5:
            draw.ellipse([x0, y0, x1, y1], fill=colour)
        else:
            draw.rectangle([x0, y0, x1, y1], fill=colour)
    smooth = np.asarray(base.filter(ImageFilter.GaussianBlur(1.0)), dtype=np.float32)
    grain = max(1.0, max(w, h) / 256)
    # A short side under 256 px is upscaled by a filter computed at 256 px, smoothing the grain away.
    gain = min(2.0, max(1.0, 256 / min(w, h)))
    gshape = (max(1, round(h / grain)), max(1, round(w / grain)))
    coarse_noise = rng.normal(0.0, 24.0 * gain, size=gshape).astype(np.float32)
    noise = np.asarray(Image.fromarray(coarse_noise, mode="F").resize((w, h), Image.Resampling.NEAREST))
    noise = noise + rng.normal(0.0, 8.0 * gain, size=(h, w)).astype(np.float32)
    return np.clip(smooth + noise[:, :, None], 0, 255).astype(np.uint8)


def _thumb(pixels: np.ndarray) -> np.ndarray:
    grey = Image.fromarray(pixels).convert("L").resize((16, 16), Image.Resampling.BILINEAR)
    v = np.asarray(grey, dtype=np.float64).ravel()
    v = v - v.mean()
    return v / (np.linalg.norm(v) or 1.0)


def encode(pixels: np.ndarray, fmt: str = "JPEG", quality: int = 88) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        Image.fromarray(pixels).save(buf, "JPEG", quality=quality)
    else:
        # Greyscale: a mode the pipeline must convert, and a noisy RGB PNG would cost 3x the bytes.
        Image.fromarray(pixels).convert("L").save(buf, "PNG")
    return buf.getvalue()


class Builder:
    """Accumulates pages and the image records they link to."""

    # Most photos are small to keep the sample a few MB; a few are larger for variety.
    _SIZES = [(256, 256), (288, 216), (240, 300), (300, 225), (224, 224), (260, 200), (320, 240),
              (200, 240), (256, 192), (240, 320), (200, 200), (280, 210)]
    _LARGE = [(480, 320), (640, 360), (360, 480)]

    def __init__(self, salt: tuple[int, ...] = (), first_caption: int = 0, avoid: list[np.ndarray] = ()) -> None:
        self.pages: list[Page] = []
        self.blobs: dict[str, Blob] = {}
        self._salt = salt  # () for the default crawl; a variant's own numbers keep its images and URLs apart
        self._n_caption = first_caption
        self._n_image = 0
        self._n_url = 0
        self.thumbs: list[np.ndarray] = list(avoid)  # new images are drawn far from these (another crawl's)

    def caption(self) -> str:
        self._n_caption += 1
        return _caption(self._n_caption)

    def pixels(self, size: tuple[int, int] | None = None) -> np.ndarray:
        self._n_image += 1
        for attempt in range(100):
            rng = np.random.default_rng([_SEED, *self._salt, self._n_image, attempt])
            if size is None:
                pool = self._LARGE if self._n_image % 20 == 0 else self._SIZES
                w, h = pool[int(rng.integers(len(pool)))]
            else:
                w, h = size
            pixels = _texture(rng, w, h)
            thumb = _thumb(pixels)
            # Re-draw rather than risk two "distinct" images landing within the dedup radius.
            if not self.thumbs or max(float(thumb @ t) for t in self.thumbs) < 0.6:
                self.thumbs.append(thumb)
                return pixels
        raise RuntimeError("could not draw a distinct sample image")

    def image_url(self, host: str = "", ext: str = "jpg") -> str:
        self._n_url += 1
        n = self._n_url
        host = host or ("img1.sample-zh.test" if n % 3 else "img2.sample-zh.test")
        salt = "".join(f"{s}-" for s in self._salt)
        stem = hashlib.sha1(f"sample-image-{salt}{n}".encode()).hexdigest()[:10]
        return f"https://{host}/uploads/2025/{1 + n % 12:02d}/{stem}.{ext}"

    def serve(self, url: str, body: bytes, content_type: str = "image/jpeg", status: int = 200,
              warc: int | None = None, **kw) -> str:
        self.blobs[url] = Blob(url, body, content_type, status, warc, **kw)
        return url

    def photo(self, size: tuple[int, int] | None = None, host: str = "", fmt: str = "JPEG",
              warc: int | None = None) -> str:
        url = self.image_url(host, "png" if fmt == "PNG" else "jpg")
        body = encode(self.pixels(size), fmt)
        return self.serve(url, body, "image/png" if fmt == "PNG" else "image/jpeg", warc=warc)

    def good(self, case: str = "good", src: str | None = None, alt: str | None = None, **photo_kw) -> Img:
        return Img(src or self.photo(**photo_kw), alt if alt is not None else self.caption(), "kept", case)

    def page(self, warc: int, url: str, imgs: list[Img], case: str = "chinese", selected: bool = True,
             **kw) -> Page:
        n = len(self.pages)
        paragraphs = kw.pop("paragraphs", None) or [_ZH_TEXT[(n + k) % len(_ZH_TEXT)] for k in range(3)]
        title = kw.pop("title", None) or _ZH_TITLES[n % len(_ZH_TITLES)]
        if "languages" not in kw:
            kw["languages"] = [("zh", "zho", "Chinese", 0.97)]
        page = Page(url, warc, case, selected, imgs, paragraphs, title, **kw)
        for img in imgs:
            blob = self.blobs.get(resolve(page, img.taken) or "")
            if blob is not None and blob.warc is None:
                blob.warc = warc
        self.pages.append(page)
        return page


def resolve(page: Page, src: str | None) -> str | None:
    if src is None or src.split(":", 1)[0].lower() in ("data", "javascript"):
        return None
    return urljoin(page.base_href or page.url, src)


def _tiny_data_uri() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (1, 1), (255, 255, 255)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _truncated_jpeg(b: Builder) -> bytes:
    whole = encode(b.pixels((320, 240)))
    return whole[: len(whole) // 2]


def _not_found_html(note: str) -> bytes:
    return f"<html><head><title>404 页面不存在</title></head><body><h1>404</h1><p>{note}</p></body></html>".encode()


def build_default() -> Builder:
    b = Builder()
    zh = "https://www.sample-zh.test"
    blog = "https://blog.sample-zh.test"
    news = "https://news.sample-gbk.test"

    # --- sample-00000 -------------------------------------------------------------------------------
    b.page(0, f"{zh}/travel/2025/03/xihu.html", [b.good() for _ in range(5)])
    dup_src = b.photo()
    b.page(0, f"{zh}/travel/2025/03/guzhen.html", [
        b.good(),
        Img(None, b.caption(), "extract.no_src", "no_src"),
        Img(_tiny_data_uri(), b.caption(), "extract.bad_url", "data_uri"),
        Img("javascript:void(0)", b.caption(), "extract.bad_url", "javascript_src"),
        b.good(src=dup_src),
        Img(dup_src, b.caption(), "extract.duplicate", "duplicate_src"),
        b.good(),
    ])
    rel_page = f"{zh}/travel/2025/03/chayuan.html"
    rel = [urljoin(rel_page, s) for s in ("images/chayuan-01.jpg", "../../../static/chayuan-02.jpg")]
    proto = [b.image_url(host) for host in ("img1.sample-zh.test", "img2.sample-zh.test")]
    for url in rel + proto:
        b.serve(url, encode(b.pixels()))
    b.page(0, rel_page, [
        b.good("relative_src", src="images/chayuan-01.jpg"),
        b.good("relative_src", src="../../../static/chayuan-02.jpg"),
        b.good("protocol_relative", src=proto[0].removeprefix("https:")),
        b.good(),
        b.good("protocol_relative", src=proto[1].removeprefix("https:")),
        b.good("relative_src", src="/uploads/" + b.photo(host="www.sample-zh.test").split("/uploads/", 1)[1]),
    ])
    base = "https://img2.sample-zh.test/gallery/2025/"
    for name in ("p01.jpg", "p02.jpg", "sub/p03.jpg"):
        b.serve(urljoin(base, name), encode(b.pixels()))
    b.serve("https://img2.sample-zh.test/shared/p04.jpg", encode(b.pixels()))
    b.page(0, f"{blog}/posts/gallery-huangshan.html", [
        b.good("base_href", src="p01.jpg"),
        b.good("base_href", src="p02.jpg"),
        b.good(),
        b.good("base_href", src="sub/p03.jpg"),
        b.good("base_href", src="/shared/p04.jpg"),
    ], base_href=base)
    b.page(0, f"{news}/html/2025/0314/a1.html", [
        *(b.good("gbk", host="static.sample-gbk.test") for _ in range(3)),
        Img(b.photo(host="static.sample-gbk.test"), "美丽的花", "source.word_count", "too_few_words"),
        *(b.good("gbk", host="static.sample-gbk.test") for _ in range(2)),
    ], case="gbk", charset="gbk", charset_label="GBK")
    b.page(0, "https://www.sample-en.test/blog/river-walk.html", [
        Img(b.photo((200, 150), host="img.sample-en.test"), alt, "", "unselected")
        for alt in _EN_ALTS
    ], case="english", selected=False, paragraphs=_EN_TEXT[:3], html_lang="en", title="A Weekend by the River",
        languages=[("en", "eng", "ENGLISH", 0.98)])
    b.page(0, f"{zh}/food/2025/03/zaocan.html", [
        Img(b.photo(), "Morning mist over the lake with two white herons", "source.caption_not_chinese",
             "english_alt"),
        Img(b.photo(), _JA_ALTS[0], "source.caption_not_chinese", "japanese_alt"),
        b.good(),
        Img(b.photo(), "", "source.caption_not_chinese", "empty_alt"),
        Img(b.photo(), None, "source.caption_not_chinese", "missing_alt"),
        b.good(),
    ])
    b.page(0, f"{zh}/food/2025/03/mifen.html", [
        Img(b.photo(), "风景", "source.word_count", "too_few_words"),
        b.good(),
        Img(b.photo(), "美丽的花", "source.word_count", "too_few_words"),
        # Seven full captions: well over 60 words, so the upper bound is not a near miss.
        Img(b.photo(), "，".join(_caption(300 + k) for k in range(7)), "source.word_count", "too_many_words"),
        b.good(),
    ])
    b.page(0, f"{blog}/posts/caoyuan-notes.html", [b.good("no_metadata_page") for _ in range(4)],
           case="no_metadata_chinese", languages=None,
           paragraphs=[_ZH_TEXT[5] + _ZH_TEXT[6] + _ZH_TEXT[11], _ZH_TEXT[0] + _ZH_TEXT[9], _ZH_TEXT[2]])
    b.page(0, f"{zh}/travel/2025/03/shuixiang.html", [
        b.good("html_entities", alt="江南水乡的清晨&amp;乌篷船缓缓驶过石桥，河边的&ldquo;老茶馆&rdquo;刚刚开门"),
        # Double-escaped, as some CMSs write it: the parser leaves "&nbsp;" for the caption normaliser.
        b.good("html_entities", alt="雨后的古镇石桥旁&amp;nbsp;一位老人坐在长椅上翻看报纸&amp;hellip;"),
        b.good("emoji", alt="周末去郊外露营🏕️，晚上看到了满天的星星✨，孩子们开心极了😄"),
        b.good("url_in_caption",
               alt="青海湖畔的油菜花开得正盛，湖水湛蓝，远处的雪山清晰可见，更多照片见 https://t.sample-zh.test/p/8"),
        b.good("extra_whitespace",
               alt="  夏夜的 城市公园里，\n\t一群孩子  在草地上捉萤火虫\u3000\u3000路灯下&nbsp;飞舞着小虫  "),
    ])
    b.page(0, "https://www.sample-ja.test/diary/kawa.html", [
        Img(b.photo((200, 150), host="img.sample-ja.test"), alt, "", "unselected") for alt in _JA_ALTS
    ], case="japanese", selected=False, paragraphs=_JA_TEXT, html_lang="ja", title="川沿いの散歩",
        languages=[("ja", "jpn", "Japanese", 0.96)])
    b.page(0, f"{zh}/travel/2025/03/lijiang.html", [b.good() for _ in range(5)],
           trailer='<!-- <img src="https://img1.sample-zh.test/old/banner.jpg" alt="旧版横幅图片"> -->')

    # --- sample-00001 -------------------------------------------------------------------------------
    missing = b.image_url("img1.sample-zh.test")  # never served: no record in any file
    gone = b.serve(b.image_url(), _not_found_html("gone"), "text/html; charset=utf-8", 404)
    html_body = b.serve(b.image_url(), _not_found_html("moved"), "image/jpeg")
    junk = b.serve(b.image_url(), _junk_bytes(), "image/jpeg")
    cut = b.serve(b.image_url(), _truncated_jpeg(b), "image/jpeg")
    b.page(1, f"{zh}/news/2025/03/fetch-cases.html", [
        Img(missing, b.caption(), "fetch.http_error", "missing_record"),
        Img(gone, b.caption(), "fetch.http_error", "http_404"),
        Img(html_body, b.caption(), "fetch.not_image", "html_as_image"),
        b.good(),
        Img(junk, b.caption(), "fetch.not_image", "random_bytes"),
        Img(cut, b.caption(), "fetch.decode_error", "truncated_jpeg"),
    ])
    b.page(1, f"{zh}/news/2025/03/geometry.html", [
        Img(b.photo((80, 80)), b.caption(), "image.geometry", "tiny_80x80"),
        Img(b.photo((640, 100)), b.caption(), "image.geometry", "wide_640x100"),
        Img(b.photo((100, 300)), b.caption(), "image.geometry", "narrow_100x300"),
        b.good("boundary_450x150", size=(450, 150)),
        b.good(),
    ])
    b.page(1, "https://www.sample-hant.test/youji/2025/hubian.html", [
        b.good("traditional", alt=alt, host="img.sample-hant.test") for alt in _HANT_CAPTIONS
    ], case="traditional", html_lang="zh-Hant", paragraphs=_HANT_TEXT, title="湖邊散步",
        languages=[("zh-Hant", "zho", "ChineseT", 0.95)])
    b.page(1, "https://www.sample-en.test/travel/tea-hills.html", [
        b.good("unselected", host="img.sample-en.test", size=(200, 150)) for _ in range(3)
    ], case="english_first_mixed", selected=False, html_lang="en", title="Tea Hills in Spring",
        paragraphs=[*_EN_TEXT, _ZH_TEXT[3]],
        languages=[("en", "eng", "ENGLISH", 0.86), ("zh", "zho", "Chinese", 0.12)])
    b.page(1, f"{news}/html/2025/0315/b2.html", [b.good("gbk", host="static.sample-gbk.test") for _ in range(5)],
           case="gb2312", charset="gb2312", charset_label="GB2312")
    dup_bytes = encode(b.pixels())
    near_pixels = b.pixels()
    dup_a = b.serve(b.image_url("img1.sample-zh.test"), dup_bytes)
    near_a = b.serve(b.image_url("img1.sample-zh.test"), encode(near_pixels, quality=90))
    b.page(1, f"{zh}/life/2025/03/maoxian.html", [
        b.good(),
        b.good("duplicate_image", src=dup_a),
        b.good(),
        b.good("near_duplicate_image", src=near_a),
        b.good(),
    ])
    # These pages' images are stored in another file: the replay fetcher must index every input WARC.
    b.page(1, f"{zh}/life/2025/03/kuawenjian.html", [
        *(b.good("image_in_other_warc", warc=2) for _ in range(4)),
        b.good(),
    ])
    b.page(1, f"{zh}/life/2025/03/shuangyu.html", [b.good() for _ in range(4)], case="zh_first_mixed",
           paragraphs=[_ZH_TEXT[4], _EN_TEXT[2], _ZH_TEXT[8]],
           languages=[("zh", "zho", "Chinese", 0.78), ("en", "eng", "ENGLISH", 0.2)])
    b.page(1, "https://www.sample-ja.test/diary/yama.html", [
        Img(b.photo((200, 150), host="img.sample-ja.test"), alt, "", "unselected")
        for alt in ["山頂の日の出を待っています", "古い町並みを歩きました", _caption(400)]
    ], case="no_metadata_japanese", selected=False, paragraphs=_JA_TEXT, html_lang="ja", languages=None,
        title="山の日の出を待つ")
    b.page(1, f"{zh}/life/2025/03/huajia.html", [
        b.good(), b.good(), b.good("png", fmt="PNG", size=(220, 200)), b.good(), b.good(),
    ])
    upper = b.good("uppercase_tag")
    upper.upper = True
    b.page(1, f"{blog}/posts/chaguan.html", [b.good(), b.good(), upper, b.good(), b.good()])
    b.page(1, f"{blog}/posts/dukou.html", [b.good() for _ in range(4)])

    # --- sample-00002 -------------------------------------------------------------------------------
    dup_b = b.serve(b.image_url("img2.sample-zh.test"), dup_bytes)
    near_b = b.serve(b.image_url("img2.sample-zh.test"), encode(near_pixels, quality=70))
    b.page(2, f"{zh}/life/2025/03/xiaomao.html", [
        # Re-used images (stage 3 redundancy): in a pair both are equally near the mean, the earlier is kept.
        Img(dup_b, b.caption(), "image.duplicate", "duplicate_image"),
        b.good(),
        Img(near_b, b.caption(), "image.duplicate", "near_duplicate_image"),
        b.good(),
        b.good(),
    ])
    b.page(2, "https://www.sample-en.test/blog/market.html", [
        Img(b.photo((200, 150), host="img.sample-en.test"), alt, "", "unselected")
        for alt in _EN_ALTS[1:]
    ], case="english", selected=False, paragraphs=_EN_TEXT[1:], html_lang="en", title="The Morning Market",
        languages=[("en", "eng", "ENGLISH", 0.99)])
    b.page(2, f"{blog}/posts/bowuguan.html", [
        *(b.good("image_in_other_warc", warc=0) for _ in range(3)),
        b.good(),
        b.good(),
    ])
    for k, stem in enumerate(["richu", "yuhou", "dongri", "huanghun", "yecan", "zaoshi", "qiuye", "shanding",
                              "hubian"]):
        imgs = [b.good("png", fmt="PNG", size=(200, 220)) if stem == "yecan" and j == 2 else b.good()
                for j in range(4 + k % 2)]
        b.page(2, f"{zh}/travel/2025/04/{stem}.html", imgs)
    _source_filter_cases(b, zh)
    _extraction_cases(b, zh)
    _refine_cases(b, zh)
    _fetch_and_quality_cases(b, zh)
    return b


# --- stage-1 safety and site cases -------------------------------------------------------------------------
# Kept apart from the extraction cases above and drawn after them, so their images stay byte-identical.
# The hosts below are covered by the default site list (tasks/data/blacklist/sites.txt) through their
# parent domains; their pairs are dropped before any fetch, so nothing is ever asked of them.
_BLACKLISTED_PAGE = "https://cn.pornhub.com/ziyuan/2025/04/jiejing.html"
_BLACKLISTED_IMAGE_HOST = "img.xvideos.com"
# Ordinary scenes that mention a phrase from the built-in adult list (tasks/data/lexicons/adult.txt).
_NSFW_CAPTIONS = [
    "深夜的老街巷口，电线杆上贴着色情网站的小广告，几位志愿者正在把它们一张张撕下来",
    # Full-width Latin: NFKC turns it into the listed "av女优".
    "旧书摊上堆着几本过期的杂志，封面印着ＡＶ女优的大幅照片，摊主正在低头整理",
    # Double-escaped, as some CMSs write it: only the caption normaliser's unescaping reveals "成人电影".
    "雨后的小城街头，一块广告牌上写着&amp;#x6210;人电影通宵放映，行人撑着伞匆匆走过",
]


def _source_filter_cases(b: Builder, zh: str) -> None:
    """Pairs that stage 1's text_nsfw and blacklisted_site rules drop, and SPEC's rule order on one page."""

    def small(host: str = "") -> str:  # dropped before fetching: small images keep the sample small
        return b.serve(b.image_url(host), encode(b.pixels((128, 112)), quality=60))

    b.page(2, f"{zh}/life/2025/04/xiaoguanggao.html", [
        Img(small(), _NSFW_CAPTIONS[0], "source.text_nsfw", "nsfw_keyword"),
        Img(small(), _NSFW_CAPTIONS[1], "source.text_nsfw", "nsfw_keyword_fullwidth"),
        b.good(size=(200, 200)),
        Img(small(_BLACKLISTED_IMAGE_HOST), b.caption(), "source.blacklisted_site", "blacklisted_image_host"),
        Img(small(), _NSFW_CAPTIONS[2], "source.text_nsfw", "nsfw_keyword_entity"),
    ])
    page_host = _BLACKLISTED_PAGE.split("/")[2]
    b.page(2, _BLACKLISTED_PAGE, [
        Img(small(page_host), b.caption(), "source.blacklisted_site", "blacklisted_page_host"),
        # Each of these fails several rules; the first in SPEC's order names the drop.
        Img(small(page_host), "Street lights along the old harbour after the rain", "source.caption_not_chinese",
             "order_not_chinese_first"),
        Img(small(page_host), _NSFW_CAPTIONS[0].replace("老街巷口", "地铁站口"), "source.text_nsfw",
             "order_nsfw_before_site"),
        Img(small(page_host), b.caption(), "source.blacklisted_site", "blacklisted_page_host"),
        Img(small(page_host), "街景", "source.blacklisted_site", "order_site_before_word_count"),
        Img(small(page_host), b.caption(), "source.blacklisted_site", "blacklisted_page_host"),
    ], case="blacklisted_page_host")


def _extraction_cases(b: Builder, zh: str) -> None:
    """Where real pages hide their images: lazy-load attributes, srcset; and what is no picture: SVG, beacons."""
    lazy, original, large = b.photo(size=(200, 200)), b.photo(size=(200, 200)), b.photo(size=(240, 200))
    small_of_large = large.replace(".jpg", "-320w.jpg")  # listed in srcset, never served: the largest is taken
    b.page(1, f"{zh}/food/2025/05/xiaochi.html", [
        Img("/static/img/loading.gif", b.caption(), "kept", "lazy_data_src", extra=(("data-src", lazy),),
             fetch_src=lazy),
        Img(_tiny_data_uri(), b.caption(), "kept", "lazy_data_original", extra=(("data-original", original),),
             fetch_src=original),
        Img(small_of_large, b.caption(), "kept", "srcset_largest",
             extra=(("srcset", f"{small_of_large} 320w, {large} 960w"),), fetch_src=large),
        Img("https://img1.sample-zh.test/static/icons/logo.svg", b.caption(), "extract.svg", "svg"),
        Img("https://stats.sample-zh.test/pixel.gif?id=xiaochi", b.caption(), "extract.tracking_pixel",
             "tracking_pixel", extra=(("width", "1"), ("height", "1")), resolved=False),
    ])


# --- stage-2 text-refinement cases ----------------------------------------------------------------------------
# Captions that pass stage 1 (Chinese, 8-25 words, no adult keyword, listed site) and then fail one refine rule
# under the default thresholds, each named by the first rule it fails. Drawn after every other case.
_REFINE_CAPTIONS = [
    # Japanese written in kanji only: no kana for stage 1 to see, but fastText reads it as Japanese.
    ("refine.lid", "kanji_only_japanese", "東京都庁舎展望室夜景撮影会場案内図、横浜中華街春節祭写真展示会場入口"),
    ("refine.lid", "kanji_only_japanese", "東京駅丸之内駅舎保存復原工事完成記念写真展示会場風景"),
    # Nothing but the buttons and file words that pages put in alt attributes.
    ("refine.stop_words", "boilerplate_only", "点击查看原图，下载高清大图，更多图片请关注"),
    ("refine.no_noun", "no_noun", "慢慢地走过来，然后轻轻地坐下，又悄悄地离开"),
    # Six Han characters of CJK Extension B: outside a character vocabulary (the placeholder tokenizer's too).
    ("refine.unk_tokens", "rare_characters", "博物馆展出的古籍里有𠀋𡈽𡌛𡑮𡢽𠮟几个生僻字，讲解员正在为游客逐一解释"),
    # A list of rare words and no common one: near-zero entropy under jieba's dictionary frequencies.
    ("refine.low_entropy", "rare_word_list", "镧系 钆 铽 镝 钬 铒 铥 镱 镥"),
    # An advertising phrase from the ads list, which stage 1 (adult list only) leaves to stage 2.
    ("refine.text_safety", "ads_keyword", "老街巷口的电线杆上贴满了兼职日结的小广告，清洁工人正在清理"),
]


def _refine_cases(b: Builder, zh: str) -> None:
    """One page whose pairs are fetched and then dropped by each refine rule."""
    def small() -> str:  # fetched, then dropped for its caption: a small image keeps the sample small
        return b.serve(b.image_url(), encode(b.pixels((128, 112)), quality=60))

    imgs = [Img(small(), alt, expected, case) for expected, case, alt in _REFINE_CAPTIONS]
    b.page(2, f"{zh}/life/2025/05/tupian.html", imgs)


def _fetch_and_quality_cases(b: Builder, zh: str) -> None:
    """The fetch policy (opt-out header, robots.txt record, private address), a header-only bomb, and images
    that fail exactly one of stage 3's texture, blur and entropy rules."""
    host = "img3.sample-zh.test"
    b.serve(f"https://{host}/robots.txt", b"User-agent: *\nDisallow: /members/\n", "text/plain", warc=2,
            standalone=True)
    # refused before decoding: small images keep the sample small
    members = b.serve(f"https://{host}/members/2025/05/a1.jpg", encode(b.pixels((128, 112)), quality=60))
    noai = b.serve(b.image_url(host), encode(b.pixels((128, 112)), quality=60),
                   headers=(("X-Robots-Tag", "noai, noimageai"),))
    bomb = b.serve(b.image_url(host, "png"), _png_header_bomb(), "image/png")
    b.page(2, f"{zh}/news/2025/05/fetch-policy.html", [
        Img(noai, b.caption(), "fetch.opt_out", "x_robots_tag_noai"),
        Img(members, b.caption(), "fetch.robots", "robots_disallow"),
        b.good("robots_allowed_path", host=host),
        Img("http://10.0.0.1/uploads/a.jpg", b.caption(), "fetch.blocked_address", "private_address"),
        Img("http://169.254.169.254/latest/meta-data/b.jpg", b.caption(), "fetch.blocked_address",
             "metadata_address"),
        Img(bomb, b.caption(), "fetch.decode_error", "png_bomb"),
    ])
    y, x = np.mgrid[0:200, 0:260].astype(np.float32)
    flat = np.full((200, 240, 3), 128, np.uint8)  # sigma ~ 0: low texture
    smooth = np.stack([x, y * 1.2, 255 - x * 0.8], axis=-1).clip(0, 255).astype(np.uint8)  # a ramp: no edges
    checker = np.repeat(((np.indices((256, 256)).sum(0) // 4 % 2) * 175 + 40).astype(np.uint8)[..., None], 3, 2)
    b.page(1, f"{zh}/news/2025/05/image-quality.html", [
        Img(b.serve(b.image_url(), encode(flat)), b.caption(), "image.low_texture", "flat_grey"),
        Img(b.serve(b.image_url(), encode(smooth)), b.caption(), "image.blur", "smooth_ramp"),
        b.good(),
        # two grey levels only (PNG, so no JPEG ringing adds more): 1 bit of entropy, sharp edges everywhere
        Img(b.serve(b.image_url(ext="png"), encode(checker, "PNG"), "image/png"), b.caption(),
             "image.low_entropy", "two_levels"),
    ])


def _png_header_bomb() -> bytes:
    """A PNG whose header declares 30000 x 30000 pixels (900 M) in under 100 bytes: refused on the header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 30001)) + chunk(
        b"IEND", b"")


def _junk_bytes() -> bytes:
    # Leading bytes chosen to match no image format's magic number.
    return b"\x00DANQING-NOT-AN-IMAGE\x00" + np.random.default_rng([_SEED, 0]).bytes(4096)

