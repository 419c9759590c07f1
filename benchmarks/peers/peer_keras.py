"""Peer baseline: Keras 3 (the API of the workflows in docs/seeds.md) on the JAX backend, on a GPU.

    python benchmarks/peers/peer_keras.py [BATCH] [SIDE] [resnet50|convnext_tiny|efficientnetv2_s]

ResNet50 (or ConvNeXtTiny, EfficientNetV2S)(weights=None, include_top=False, pooling='avg')
+ Dense(10); base called with training=False (BN frozen). Modes: head / conv5 (ResNet50:
layers[:143] frozen; ConvNeXt: the layers before its last downsampling block;
EfficientNetV2: those before block6a) / full. Keras has no ViT: for vit_b_16_torchvision
it prints one line saying so.
"""
import json, os, sys, time
os.environ.setdefault("KERAS_BACKEND", "jax")
import numpy as np
import keras

B = int(sys.argv[1]) if len(sys.argv) > 1 else 256
RES = int(sys.argv[2]) if len(sys.argv) > 2 else 224
MODEL = sys.argv[3] if len(sys.argv) > 3 else "resnet50"
STEPS = 30
APPLICATIONS = {"resnet50": keras.applications.ResNet50, "convnext_tiny": keras.applications.ConvNeXtTiny,
                "efficientnetv2_s": keras.applications.EfficientNetV2S}
# The first layer conv5 mode trains (ResNet50's is layers[143]).
FIRST_TRAINED = {"convnext_tiny": "convnext_tiny_downsampling_block_2", "efficientnetv2_s": "block6a_expand_conv"}
keras.mixed_precision.set_global_policy("mixed_bfloat16")


def build(mode):
    base = APPLICATIONS[MODEL](weights=None, include_top=False, pooling="avg",
                               input_shape=(RES, RES, 3))
    if mode == "head":
        base.trainable = False
    elif mode == "conv5":
        names = [layer.name for layer in base.layers]
        cut = 143 if MODEL == "resnet50" else names.index(FIRST_TRAINED[MODEL])
        for layer in base.layers[:cut]:
            layer.trainable = False
    inputs = keras.Input((RES, RES, 3))
    x = base(inputs, training=False)
    outputs = keras.layers.Dense(10, dtype="float32")(x)
    m = keras.Model(inputs, outputs)
    m.compile(optimizer=keras.optimizers.Adam(1e-4),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return m


def run(mode):
    m = build(mode)
    x = np.random.rand(B, RES, RES, 3).astype("float32")
    y = np.random.randint(0, 10, (B,))
    t0 = time.time()
    for _ in range(3):
        m.train_on_batch(x, y)
    warm = time.time() - t0
    t0 = time.time()
    for _ in range(STEPS):
        loss = m.train_on_batch(x, y)
    float(np.asarray(loss))
    dt = (time.time() - t0) / STEPS
    tr = sum(int(np.prod(w.shape)) for w in m.trainable_weights)
    print(json.dumps(dict(peer="keras-jax", model=MODEL, mode=mode, batch=B, res=RES, trainable=tr,
                          img_s=round(B / dt, 1), step_ms=round(dt * 1e3, 2), warmup_s=round(warm, 1))), flush=True)


def run_forward():
    m = build("head")
    x = np.random.rand(B, RES, RES, 3).astype("float32")
    for _ in range(3):
        m.predict_on_batch(x)
    t0 = time.time()
    for _ in range(STEPS):
        out = m.predict_on_batch(x)
    np.asarray(out)
    dt = (time.time() - t0) / STEPS
    print(json.dumps(dict(peer="keras-jax", model=MODEL, mode="forward", batch=B, res=RES,
                          img_s=round(B / dt, 1), step_ms=round(dt * 1e3, 2))), flush=True)


if __name__ == "__main__":
    if MODEL not in APPLICATIONS:
        print(json.dumps(dict(peer="keras-jax", model=MODEL, skipped="keras.applications has no such model")))
        sys.exit(0)
    run_forward()
    for mode in ("head", "conv5", "full"):
        run(mode)
