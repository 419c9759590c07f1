"""The torchvision weights fineflax names `torchvision:<member>` after the members of
torchvision's weight enums (`ResNet50_Weights.IMAGENET1K_V2`): for each backbone, each
member's file under https://download.pytorch.org/models/ (its name holds the 8-hex
sha256 prefix torch hub checks), ImageNet-1k top-1 as the member's metadata gives it, and
licence. fineflax.weights.sources makes them `Source`s; the tests compare them with the
installed torchvision's enums.
"""

from __future__ import annotations

LICENCE = 'BSD-3-Clause (torchvision); ImageNet terms of use apply'
# The SWAG weights (Singh et al. 2022, pre-trained on Instagram hashtags), as torchvision's
# documentation gives their terms.
SWAG_LICENCE = 'CC BY-NC 4.0 (facebookresearch/SWAG): non-commercial use only'
# EfficientNetV2-L's, which torchvision ported from the paper's code (google/automl).
AUTOML_LICENCE = 'Apache-2.0 (ported from google/automl); ImageNet terms of use apply'

# backbone -> (member, file name, top-1, licence) of each member of its enum.
WEIGHTS: dict[str, tuple[tuple[str, str, str, str], ...]] = {
    'resnet50_torchvision': (
        ('IMAGENET1K_V1', 'resnet50-0676ba61.pth', '76.13%', LICENCE),
        ('IMAGENET1K_V2', 'resnet50-11ad3fa6.pth', '80.86%', LICENCE),
    ),
    # ConvNeXt_*_Weights: IMAGENET1K_V1 only.
    'convnext_tiny_torchvision': (
        ('IMAGENET1K_V1', 'convnext_tiny-983f1562.pth', '82.52%', LICENCE),
    ),
    'convnext_small_torchvision': (
        ('IMAGENET1K_V1', 'convnext_small-0c510722.pth', '83.62%', LICENCE),
    ),
    'convnext_base_torchvision': (
        ('IMAGENET1K_V1', 'convnext_base-6075fbad.pth', '84.06%', LICENCE),
    ),
    'convnext_large_torchvision': (
        ('IMAGENET1K_V1', 'convnext_large-ea097f82.pth', '84.41%', LICENCE),
    ),
    # ViT_*_Weights: IMAGENET1K_V1 (224 px) and the SWAG ones (E2E: fine-tuned at 384 /
    # 512 px, their position embeddings resized at load; LINEAR: a linear head on the
    # frozen SWAG trunk, 224 px).
    'vit_b_16_torchvision': (
        ('IMAGENET1K_V1', 'vit_b_16-c867db91.pth', '81.07%', LICENCE),
        ('IMAGENET1K_SWAG_E2E_V1', 'vit_b_16_swag-9ac1b537.pth', '85.30%', SWAG_LICENCE),
        ('IMAGENET1K_SWAG_LINEAR_V1', 'vit_b_16_lc_swag-4e70ced5.pth', '81.89%', SWAG_LICENCE),
    ),
    'vit_b_32_torchvision': (('IMAGENET1K_V1', 'vit_b_32-d86f8d99.pth', '75.91%', LICENCE),),
    'vit_l_16_torchvision': (
        ('IMAGENET1K_V1', 'vit_l_16-852ce7e3.pth', '79.66%', LICENCE),
        ('IMAGENET1K_SWAG_E2E_V1', 'vit_l_16_swag-4f3808c9.pth', '88.06%', SWAG_LICENCE),
        ('IMAGENET1K_SWAG_LINEAR_V1', 'vit_l_16_lc_swag-4d563306.pth', '85.15%', SWAG_LICENCE),
    ),
    'vit_l_32_torchvision': (('IMAGENET1K_V1', 'vit_l_32-c7638314.pth', '76.97%', LICENCE),),
    # EfficientNet_V2_*_Weights: IMAGENET1K_V1 only (S and M trained by torchvision at
    # 384 / 480 px; L ported, at 480 px, for inputs scaled to [-1, 1]).
    'efficientnet_v2_s_torchvision': (
        ('IMAGENET1K_V1', 'efficientnet_v2_s-dd5fe13b.pth', '84.23%', LICENCE),
    ),
    'efficientnet_v2_m_torchvision': (
        ('IMAGENET1K_V1', 'efficientnet_v2_m-dc08266a.pth', '85.11%', LICENCE),
    ),
    'efficientnet_v2_l_torchvision': (
        ('IMAGENET1K_V1', 'efficientnet_v2_l-59c71312.pth', '85.81%', AUTOML_LICENCE),
    ),
}
# Each enum's DEFAULT.
DEFAULTS = {backbone: 'torchvision:IMAGENET1K_V1' for backbone in WEIGHTS} | {
    'resnet50_torchvision': 'torchvision:IMAGENET1K_V2'
}
