import pytest
import torch
from PIL import Image

from models.network import build_network
from models.preprocessing import eval_transform
from models.registry import UnknownBackboneError, WeightsError, create_backbone, get_spec, list_backbones

REQUIRED = {"efficientnet_lite0", "resnet18", "resnet50", "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny"}
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


def test_lite0_imagenet_weights_classify_real_pictures():
    skimage_data = pytest.importorskip("skimage.data")
    spec = get_spec("efficientnet_lite0")
    model = spec.build_imagenet_model().eval()
    model.load_state_dict(spec.load_imagenet_state_dict())
    transform = eval_transform(spec.preprocessing)
    batch = torch.stack([transform(Image.fromarray(skimage_data.chelsea())), transform(Image.fromarray(skimage_data.coffee()))])
    with torch.no_grad():
        probabilities = model(batch).softmax(1)
    top = probabilities.argmax(1).tolist()
    assert top[0] in CAT_CLASSES, f"chelsea predicted as ImageNet class {top[0]}"
    assert top[1] == ESPRESSO
    assert probabilities[1, ESPRESSO] > 0.5


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
