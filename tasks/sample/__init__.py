"""The offline sample crawl: three Common-Crawl-style WARCs of generated pages and images, plus expected fates;
and two small variants, curated one after the other, for cross-batch dedup."""

from tasks.sample.crawl import COMPLETION_FILE, MANIFEST_FILE, N_WARCS, SAMPLE_SNAPSHOT, SampleCrawl, write_sample_crawl
from tasks.sample.fates import Fates, predict_fates
from tasks.sample.variants import BAND_MARGIN, VARIANTS, write_sample_variant

__all__ = ["BAND_MARGIN", "COMPLETION_FILE", "MANIFEST_FILE", "N_WARCS", "SAMPLE_SNAPSHOT", "VARIANTS", "Fates",
           "SampleCrawl", "predict_fates", "write_sample_crawl", "write_sample_variant"]
