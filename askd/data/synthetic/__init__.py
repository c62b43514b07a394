"""Embedded procedural face generator: ``SyntheticFaces``, the default training data (nothing is downloaded).

Shapes: an item is ``(image, label)`` with image uint8 (3, size, size) RGB and label an int in
[0, num_identities); ``render`` returns uint8 (B, 3, size, size). Item ``i`` is identity
``i // samples_per_identity``, sample ``i % samples_per_identity``.

An identity is a cartoon face drawn on a coordinate grid from soft-edged ellipses and bumps:
  coarse cues (survive 8x down-sampling): face shape (axes, jaw), skin tone, hair colour and style
      (volume, length, hairline, parting, baldness), ears, eye spacing/size/iris colour, brows, nose,
      mouth and lip colour, glasses, beard/moustache, blush. Continuous traits spread over the middle
      COARSE fraction of their ranges: the knob that sets how hard the 8x task is;
  fine cues (1-4 px structure, lost at 14 px): moles, freckles, a patch of fine stripes (period 2-3.5 px) and a
      small random binary "birthmark" code, baked into a per-identity detail texture that moves with the
      face.
Each image adds jitter: pose (translation, in-plane rotation, scale), expression (smile, open mouth,
eye openness, gaze), glasses on or off, lighting (brightness, directional gradient, white balance),
background, shirt, gaussian noise.

Determinism: identity parameters come from a torch.Generator seeded by a hash of (seed, split, identity),
per-image jitter and noise from one seeded by (seed, split, identity, sample); the ``train`` and ``eval``
splits hash differently, so they hold disjoint random identities. Batched drawing uses exactly rounded
element-wise arithmetic (+ - * / sqrt min max abs floor), per-pixel grid_sample and an order-free scatter
max, never exp/sin/sigmoid, whose SIMD and scalar code paths may differ in the last bit; so an image's bits
do not depend on the batch it is rendered in, on call order or on the thread count. ``__getitem__`` calls
``render``.

Speed (measured with torch.set_num_threads(1) on a 2-core CPU shared with other jobs): ``render`` of 64
images at 112x112 takes 95-130 ms; ``__getitem__`` 3-6 ms per image. ``render`` draws single-threaded
(see dataset.one_thread), in chunks of CHUNK images, each group of shapes only on the pixels it can touch.

Learnability (a 4-stage CNN, ~2 min on 2 cores, 100 train identities x 20 images, verification on 50 held-out
``eval`` identities): 98% at 112 px, 96% at 112 px without the fine marks, 89% trained and tested at 14 px
(``degrade(x, 14)``).

``python -m askd.data.synthetic OUT.png`` saves a grid of 8 identities x 6 samples to look at.

Modules: ``sampling`` (seeded draws: identity traits, per-image jitter), ``textures`` (the fine marks, drawn and
baked into a detail texture), ``geometry`` (shape coefficients, and the pixels each group of shapes can touch),
``raster`` (drawing a chunk of images), ``dataset`` (``SyntheticFaces``), ``cli`` (the command above).
"""

from .cli import main
from .dataset import SPLITS, SyntheticFaces

__all__ = ["SPLITS", "SyntheticFaces", "main"]
