"""What lipkit accepts as an image, in one place and without importing PIL or torch (the command line
reads it at start-up): the file extensions, the one pixel limit, and the reasons an image is refused."""

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")  # preference order in a shard
MAX_PIXELS = 64_000_000  # larger images are refused as decompression bombs, everywhere in lipkit

# Why an image could not be used; `lipkit.data.images.try_load_image` returns one of these names.
IMAGE_REASONS = {
    "missing_file": "the image file does not exist",
    "unreadable_file": "the image file cannot be read (permissions)",
    "empty_file": "the image file is empty (0 bytes)",
    "not_an_image": "the file is not an image (unknown format)",
    "corrupt_image": "the image is truncated or corrupt",
    "too_large": f"the image has more than {MAX_PIXELS:,} pixels (decompression bomb limit)",
}

# Why a multi-frame sample (data/frames.py) could not be used, besides its frames' image reasons.
VIDEO_REASONS = {
    "broken_video": "the video cannot be decoded, has no video stream or is truncated",
    "no_frames": "the sample's frame list is empty, or two of its frame members share a number",
    "too_long_video": "the video has more frames than the limit",
}
