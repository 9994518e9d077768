"""The frozen encoders extract_features.py runs: ESM-1b / fair-esm models (load_sequence_encoder, is_real_esm, legacy
names), the safe unpickler for checkpoints, GearNet-Edge checkpoints, PubMedBERT-abs (text), the tiny random-init
encoders for tests, load_encoder, and the encoder precision (--precision). extract_features.py imports these names, so
extract_features.<name> keeps working."""
import argparse
import contextlib
import pickle
import tempfile
import re
import types
import warnings
from collections import OrderedDict
from pathlib import Path

import torch

import gearnet
from cache import MODALITIES
from sources import TEXT_FIELDS, FatalError, InputError, full_reason, log, require  # noqa: F401

ESM1B_NAME = "esm1b_t33_650M_UR50S"
ESM_URL = "https://dl.fbaipublicfiles.com/fair-esm/models/{}.pt"  # fair-esm's esm/pretrained.py
ESM1B_URL = ESM_URL.format(ESM1B_NAME)
ESM_NAME = re.compile(r"^(esm1b|esm1v|esm1|esm2)_t(\d+)_")  # fair-esm models with ESM-1b's interface
PUBMEDBERT = "microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract"
TINY_NAMES = {"seq": "tiny:esm2_t6 (random init)", "str": "tiny:gearnet_edge [32]*6 (random init)",
              "func": "tiny:bert_2layer (random init)"}
TINY_ESM_LAYER = 6
TINY_HINT = " (--encoders tiny runs small random-init encoders instead: for tests only, the features mean nothing)"


# ----------------------------------------------------------------------------- encoders

TINY_WORDS = """
the of and in to a is by with for from as on or at that this which are be an its it not into
protein proteins enzyme enzymes kinase kinases phosphatase synthase synthetase reductase oxidase
dehydrogenase transferase hydrolase isomerase ligase lyase protease peptidase ribosomal subunit
receptor transporter channel factor domain domains family families subfamily member members belongs
binding binds bind catalyzes catalyzing catalytic activity activation activates inhibits regulation
regulates regulator transcription transcriptional translation replication repair dna rna mrna trna
rrna atp gtp nad nadh nadp nadph coa acid acids amino metal zinc iron magnesium calcium copper heme
membrane membranes cytoplasm cytoplasmic cytosol nucleus nuclear mitochondrion mitochondrial
mitochondria chloroplast plastid secreted extracellular periplasm periplasmic cell wall surface
golgi apparatus endoplasmic reticulum lumen matrix vacuole lysosome peroxisome single pass multi
type i ii iii iv transmembrane integral peripheral side note similarity similar contains sequence
function functions pathway biosynthesis metabolism degradation signaling signal transduction complex
component components cofactor substrate product reaction involved required essential plays role
process processes response stress growth development cell cycle division hydrolysis transport
uptake export import homodimer heterodimer monomer dimer trimer tetramer oligomer interacts
interaction with subunits chain chains alpha beta gamma delta epsilon sigma small large putative
uncharacterized probable hypothetical fragment precursor mature form forms isoform isoforms
specific specifically also may can has have both other some each one two three via during between
through against under upon within without high low level levels expression expressed gene genes
encoded encodes bacterial bacteria viral virus human mouse yeast plant plants serine threonine
tyrosine cysteine histidine lysine arginine glycine alanine proline glutamate aspartate glutamine
methionine sugar glucose phosphate phosphorylation ubiquitin ubiquitination glycosylation lipid
fatty oxidoreductase dehydratase carboxylase decarboxylase aminotransferase methyltransferase
acetyltransferase glycosyltransferase helicase polymerase nuclease endonuclease exonuclease
topoisomerase gyrase ferredoxin cytochrome oxygen electron hydrogen sodium potassium chloride ion
ions water small molecule molecules antibiotic resistance toxin immune defense host
"""
TINY_SUFFIXES = "s es ed ing ase ases ion ions ic al ly ity ated ate ation er ers or ors in ins ein ar".split()


def tiny_vocab():
    """The tiny text encoder's WordPiece vocabulary: BERT's special tokens, single characters (and their
    '##' pieces, so every lowercase ASCII word can be spelled), common biology words and suffixes."""
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789") + list(".,;:()[]{}-+/'\"%=<>*_&#@!?~|")
    words = TINY_WORDS.split()
    vocab = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars[:36]]
             + words + ["##" + s for s in TINY_SUFFIXES])
    return list(dict.fromkeys(vocab))  # a token listed twice would get two ids


# Checkpoints from elsewhere (fair-esm's .pt, GearNet's .pth) are unpickled by SafeUnpickler: every global
# the pickle names is looked up in an allowlist (_safe_globals: torch's own weights_only one -- tensor and storage
# rebuilding, dtypes, OrderedDict, ... -- plus argparse.Namespace, which fair-esm's 'args'/'cfg' are); any
# other global becomes an Unloaded placeholder class: nothing is imported, nothing is called. So a file
# with optimizer state, numpy scalars or classes of someone's training code loads, and a file built to run
# code (os.system in a __reduce__) runs none. torch.load takes it as pickle_module (which requires
# weights_only=False: the allowlist here is the stricter one about code).

class Unloaded:
    """Stands in for an object of a pickled class or function outside SAFE_GLOBALS: whatever the pickle
    passes to it (arguments, state, items) is kept as data, nothing is executed."""
    qualname = "?"

    def __new__(cls, *args, **kwargs):
        self = object.__new__(cls)
        self.args, self.kwargs, self.state, self.items = args, kwargs, None, {}
        return self

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        self.items[key] = value

    def append(self, value):
        self.items[len(self.items)] = value

    def extend(self, values):
        for value in values:
            self.append(value)

    def __repr__(self):
        return f"<not loaded: {self.qualname}>"


_UNLOADED = {}


def _safe_globals():
    allowed = {"argparse.Namespace": argparse.Namespace, "collections.OrderedDict": OrderedDict,
               "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
               "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
               "torch.Size": torch.Size, "torch.device": torch.device}
    allowed.update({str(t): t for t in (torch.float16, torch.float32, torch.float64, torch.bfloat16,
                                        torch.int64, torch.int32, torch.uint8, torch.bool)})
    try:  # torch's weights_only allowlist (private, present since torch 2.0)
        from torch import _weights_only_unpickler
        allowed.update(_weights_only_unpickler._get_allowed_globals())
    except (ImportError, AttributeError):
        pass
    return allowed


class SafeUnpickler(pickle.Unpickler):
    safe_globals = None

    def find_class(self, module, name):
        key = f"{module}.{name}"
        if SafeUnpickler.safe_globals is None:
            SafeUnpickler.safe_globals = _safe_globals()
        if key in SafeUnpickler.safe_globals:
            return SafeUnpickler.safe_globals[key]
        if key not in _UNLOADED:
            _UNLOADED[key] = type(f"Unloaded[{key}]", (Unloaded,), {"qualname": key})
        return _UNLOADED[key]


SAFE_PICKLE = types.ModuleType("safe_pickle", "pickle_module for torch.load: SafeUnpickler")
SAFE_PICKLE.Unpickler = SafeUnpickler
SAFE_PICKLE.load = lambda file, **kw: SafeUnpickler(file, **kw).load()


def safe_load(path):
    """torch.load of a checkpoint file through SafeUnpickler, on the CPU."""
    return torch.load(path, map_location="cpu", weights_only=False, pickle_module=SAFE_PICKLE)


def _describe(x):
    return f"a {type(x).__name__}" + (f" with keys {sorted(map(str, x))[:8]}" if isinstance(x, dict) else "")


class SeqEncoder:
    """A fair-esm model; __call__(sequences) -> per-residue [L_i, d] float32 (BOS/EOS rows dropped).
    name / weights: the fair-esm name and the local file it came from ("" for the hub cache)."""

    def __init__(self, model, alphabet, layer, device, name="", weights="", precision="fp32"):
        self.model, self.alphabet, self.layer, self.device = model.to(device).eval(), alphabet, layer, device
        self.name, self.weights, self.precision = name, weights, precision
        self.batch_converter = alphabet.get_batch_converter()
        self.offset = int(alphabet.prepend_bos)

    @torch.no_grad()
    def __call__(self, seqs):
        _, _, tokens = self.batch_converter([(str(k), s) for k, s in enumerate(seqs)])  # (B, T)
        with forward_precision(self.precision, self.device):
            out = self.model(tokens.to(self.device), repr_layers=[self.layer])["representations"][self.layer]
        return [out[k, self.offset:self.offset + len(s)].float().cpu() for k, s in enumerate(seqs)]


def build_text_ids(fields, encode, cls_id, sep_id, max_field_tokens=128, max_total=512):
    """Token ids [CLS] f1 [SEP] f2 [SEP] f3 [SEP] f4 of ProtST's four fields, in TEXT_FIELDS order.
    `encode(text)` gives a field's ids without special tokens; each field is cut to max_field_tokens,
    empty fields are left out, and the last field is trimmed so the total stays <= max_total."""
    pieces = []
    for name in TEXT_FIELDS:
        text = (fields.get(name) or "").strip()
        ids = list(encode(text))[:max_field_tokens] if text else []
        if ids:
            pieces.append(ids)
    if not pieces:
        raise InputError(f"no text: the fields {', '.join(TEXT_FIELDS)} are all empty")
    out = [cls_id]
    for ids in pieces:
        room = max_total - len(out) - (len(out) > 1)  # a [SEP] precedes every field but the first
        if room <= 0:
            break
        out += ([sep_id] if len(out) > 1 else []) + ids[:room]
    return out


class TextEncoder:
    """A BERT tokenizer + model; ids(fields) builds the joined text, __call__(id lists) -> [L'_i, d]."""

    def __init__(self, tokenizer, model, device, precision="fp32"):
        self.tokenizer, self.model, self.device, self.precision = tokenizer, model.to(device).eval(), device, precision

    def ids(self, fields):
        def encode(text):
            return self.tokenizer.encode(text, add_special_tokens=False, truncation=True, max_length=128)
        return build_text_ids(fields, encode, self.tokenizer.cls_token_id, self.tokenizer.sep_token_id)

    @torch.no_grad()
    def __call__(self, id_lists):
        width = max(len(x) for x in id_lists)
        input_ids = torch.full((len(id_lists), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for k, x in enumerate(id_lists):
            input_ids[k, :len(x)] = torch.tensor(x)
            mask[k, :len(x)] = 1
        with forward_precision(self.precision, self.device):
            out = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                             token_type_ids=torch.zeros_like(input_ids).to(self.device)).last_hidden_state
        return [out[k, :len(x)].float().cpu() for k, x in enumerate(id_lists)]  # (L'_k, d)


def gearnet_state_dict(path):
    """The GearNet keys, prefix stripped, of a GearNet-Edge checkpoint as GearNet's scripts and torchdrug
    save them: a plain state_dict (script/pretrain.py: torch.save(model.state_dict())), an Engine.save
    solver checkpoint {'model': task state_dict ('model.layers...', 'mlp...'), 'optimizer': ...}, or either
    with DDP's 'module.' prefix. Read with safe_load."""
    sd = safe_load(path)
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
        sd = sd["model"]
    if not isinstance(sd, dict):
        raise ValueError(f"expected a state_dict (dict of tensors), found {_describe(sd)}")
    prefixes = {m.group(1) or "" for k in sd
                if (m := re.match(r"^(.*\.)?layers\.0\.self_loop\.weight$", str(k)))}
    if len(prefixes) != 1:
        raise ValueError(f"expected one GearNet in the state_dict, found {len(prefixes)} "
                         f"('layers.0.self_loop.weight' under {sorted(prefixes) or 'no prefix'})")
    prefix = prefixes.pop()
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


# ----------------------------------------------------------------------------- fair-esm models

def esm_model_name(cfg):
    """--esm-model; by default the --esm-weights file's stem (fair-esm's load_model_and_alphabet_local
    names a local model by it), else ESM-1b."""
    if cfg.esm_model:
        return cfg.esm_model
    return Path(cfg.esm_weights).stem if cfg.esm_weights else ESM1B_NAME


def esm_checkpoint(name):
    """Path of fair-esm's checkpoint <name>.pt in the torch hub cache (where fair-esm's own hub loader keeps
    it), downloaded from fair-esm's URL when not there yet (download_url_to_file writes a temporary file and
    renames it, so a broken download leaves none)."""
    if not ESM_NAME.match(name):
        raise FatalError(f"--esm-model {name!r} is not a fair-esm ESM-1b / ESM-1v / ESM-2 name (e.g. {ESM1B_NAME}, "
                         "esm2_t33_650M_UR50D); a local checkpoint goes to --esm-weights PATH")
    path = Path(torch.hub.get_dir()) / "checkpoints" / f"{name}.pt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        log(f"download {ESM_URL.format(name)} -> {path}")
        torch.hub.download_url_to_file(ESM_URL.format(name), str(path), progress=True)
    return path


def load_esm(path, name=ESM1B_NAME):
    """(model, alphabet, layer) of a fair-esm checkpoint file, read with safe_load: only 'args' (ESM-1,
    ESM-1b, ESM-1v: fairseq's Namespace, 'encoder.sentence_encoder.' keys) or 'cfg' (ESM-2: cfg['model'] a
    Namespace) and 'model' are used, whatever else the file holds; built by fair-esm's
    load_model_and_alphabet_core (the format, not the name, picks ESM-2's code). layer = the model's
    last layer. The contact-regression weights are not needed (representations only)."""
    import esm
    data = safe_load(path)
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict) or not ("args" in data or "cfg" in data):
        raise ValueError(f"not a fair-esm checkpoint: expected a dict with 'model' and 'args' (ESM-1b) or 'cfg' "
                         f"(ESM-2), found {_describe(data)}")
    if "cfg" in data:
        cfg = data["cfg"]
        model_cfg = cfg.get("model") if isinstance(cfg, dict) else getattr(cfg, "model", None)
        if not isinstance(model_cfg, argparse.Namespace):
            raise ValueError(f"cfg['model'] is {_describe(model_cfg)}, expected an argparse.Namespace (ESM-2 format)")
        payload, core = {"cfg": {"model": model_cfg}, "model": data["model"]}, "esm2"
    else:
        if not isinstance(data["args"], argparse.Namespace):
            raise ValueError(f"'args' is {_describe(data['args'])}, expected an argparse.Namespace (ESM-1b format)")
        payload, core = {"args": data["args"], "model": data["model"]}, name.replace("esm2", "esm1b")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Regression weights not found")
        model, alphabet = esm.pretrained.load_model_and_alphabet_core(core, payload, None)
    return model.eval(), alphabet, len(model.layers)


def tiny_esm():
    """(model, alphabet, layer) of the tiny encoder set: an ESM-2 of 6 layers, width 64, seed 0."""
    import esm
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
        model = esm.model.esm2.ESM2(num_layers=TINY_ESM_LAYER, embed_dim=64, attention_heads=4, alphabet=alphabet)
    return model.eval(), alphabet, TINY_ESM_LAYER


def esm_fix(name, weights):
    """The flag that fixes a failed ESM load."""
    if weights:
        return (f"check --esm-weights {weights}: a fair-esm checkpoint (.pt with 'model' and 'args' or 'cfg'), "
                f"e.g. {ESM_URL.format(name if ESM_NAME.match(name) else ESM1B_NAME)}")
    cached = Path(torch.hub.get_dir()) / "checkpoints" / f"{name}.pt"
    if cached.exists():
        return f"the cached {cached} may be damaged: delete it, or pass --esm-weights PATH"
    return (f"no network here? download {ESM_URL.format(name)} elsewhere and pass --esm-weights PATH "
            f"(or put it at {cached})")


def resolve_esm(name, weights=None):
    """(model, alphabet, layer, weights path or "") of a real fair-esm model: from `weights` when given,
    else fair-esm's file in the torch hub cache (downloaded once). FatalError with the full reason and the
    flag that fixes it when it cannot be loaded."""
    try:
        if weights:
            path = Path(weights).resolve()
            model, alphabet, layer = load_esm(path, name)
            m = ESM_NAME.match(name)
            if m and int(m.group(2)) != layer:
                log(f"warning: --esm-weights {weights} holds a {layer}-layer model, the name {name} says "
                    f"{m.group(2)}; its last layer, {layer}, gives the features", err=True)
            return model, alphabet, layer, str(path)
        model, alphabet, layer = load_esm(esm_checkpoint(name), name)
        return model, alphabet, layer, ""
    except FatalError:
        raise
    except Exception as e:  # no network, missing or corrupt file, wrong format: all end the run the same way
        raise FatalError(f"could not load ESM model {name}{f' from {weights}' if weights else ''}: "
                         f"{type(e).__name__}: {full_reason(e)} -- fix: {esm_fix(name, weights)}{TINY_HINT}") from None


def legacy_esm_name(info):
    """The fair-esm name of an info.json written before esm_model existed (always ESM-1b then)."""
    name = str(info.get("encoders", {}).get("seq", ""))
    return name if ESM_NAME.match(name) else ESM1B_NAME


def is_real_esm(info):
    """True when the feature set's sequence features came from a real fair-esm model (not tiny, not
    demo.py's synthetic features)."""
    return (not info.get("tiny") and not info.get("synthetic")
            and bool(info.get("esm_model") or info.get("encoders", {}).get("seq")))


def load_sequence_encoder(info, esm_weights=None, device="cpu"):
    """(model, alphabet, layer, label): the sequence encoder a feature set's seq features came from, rebuilt
    from its info.json for ESM in the loop (finetune.py --esm finetune). Tiny sets get the tiny ESM-2
    exactly as the tiny extraction builds it; real ones the fair-esm model info["esm_model"] from
    `esm_weights`, else info["esm_weights"], else fair-esm's hub cache / download. FatalError (full reason,
    flag that fixes it) when it cannot be had or does not match the features (layer count, width)."""
    if info.get("synthetic"):
        raise FatalError("the feature set's sequence features are synthetic (demo.py): no sequence encoder made "
                         "them; use --esm frozen, or extract real features")
    if info.get("tiny"):
        model, alphabet, layer = tiny_esm()
        label = TINY_NAMES["seq"]
    else:
        name = info.get("esm_model") or legacy_esm_name(info)
        weights = esm_weights or info.get("esm_weights") or None
        if weights and not Path(weights).exists():
            raise FatalError(f"ESM weights {weights} (from {'--esm-weights' if esm_weights else 'info.json'}) not "
                             f"found: pass --esm-weights PATH of the {name} checkpoint the features were made with")
        model, alphabet, layer, used = resolve_esm(name, weights)
        label = name + (f" ({used})" if used else "")
        want_layer, want_dim = info.get("esm_layer"), info.get("dims", {}).get("seq")
        dim = model.embed_tokens.embedding_dim
        if (want_layer is not None and want_layer != layer) or (want_dim is not None and want_dim != dim):
            raise FatalError(f"{label} has {layer} layers of width {dim}, the features came from layer "
                             f"{want_layer} of width {want_dim}: pass --esm-weights PATH of the model the "
                             "features were made with")
    return model.to(device).eval(), alphabet, layer, label


# ----------------------------------------------------------------------------- loading the encoders

def text_model_name(cfg):
    """--text-model as recorded: a local directory by its absolute path, a hub name as given."""
    path = Path(cfg.text_model).expanduser()
    return str(path.resolve()) if path.is_dir() else cfg.text_model


def encoder_names(cfg):
    """The encoders as info.json and the manifest record them; ' [bf16]' / ' [tf32]' when not run in fp32."""
    precision = resolve_precision(cfg.precision, cfg.device)
    tags = {m: "" if p == "fp32" else f" [{p}]"
            for m, p in zip(MODALITIES, (precision, structure_precision(precision, cfg.device), precision))}
    ckpt = Path(cfg.gearnet_ckpt).name if cfg.gearnet_ckpt else "?"
    names = dict(TINY_NAMES) if cfg.encoders == "tiny" else {"seq": esm_model_name(cfg), "str": f"gearnet_edge:{ckpt}",
                                                            "func": text_model_name(cfg)}
    return {m: name + tags[m] for m, name in names.items()}


def text_fix(cfg):
    path = Path(cfg.text_model).expanduser()
    if path.is_dir():
        return (f"check --text-model {cfg.text_model}: a directory with config.json, vocab.txt (or tokenizer.json) "
                "and the weights (pytorch_model.bin or model.safetensors)")
    if cfg.text_model.startswith(("/", ".", "~")) or cfg.text_model.count("/") > 1:
        return (f"--text-model {cfg.text_model}: no such directory; pass --text-model DIR of a local copy of "
                f"{PUBMEDBERT} (config.json, vocab.txt, weights)")
    return (f"no network here (or HF_HUB_OFFLINE=1)? download {cfg.text_model} elsewhere (e.g. `hf download "
            f"{cfg.text_model} --local-dir DIR`) and pass --text-model DIR")


def load_text_model(name):
    """(tokenizer, model) of a Hugging Face BERT-style model; the pooler, unused, is not built for BERT."""
    import transformers
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "weights not used: cls.predictions..." is expected
    try:
        config = AutoConfig.from_pretrained(name)
        extra = {"add_pooling_layer": False} if config.model_type == "bert" else {}
        return AutoTokenizer.from_pretrained(name), AutoModel.from_pretrained(name, **extra)
    finally:
        transformers.logging.set_verbosity(verbosity)


def load_encoder(modality, cfg, device):
    """The encoder of one modality, loaded on first need. Weights that cannot be had raise FatalError
    with the full reason and the flag that fixes it (--esm-weights, --text-model, --gearnet-ckpt)."""
    tiny = cfg.encoders == "tiny"
    precision = getattr(cfg, "precision", "fp32")     # a partial config (analyze.py --name, tests): exact fp32
    if modality == "seq":
        if tiny:
            model, alphabet, layer = tiny_esm()
            return SeqEncoder(model, alphabet, layer, device, TINY_NAMES["seq"], precision=precision)
        name = esm_model_name(cfg)
        model, alphabet, layer, weights = resolve_esm(name, cfg.esm_weights)
        log(f"sequence encoder: {name}{f' from {weights}' if weights else ''}, layer {layer} of {layer}")
        return SeqEncoder(model, alphabet, layer, device, name, weights, precision)
    if modality == "str":
        if tiny:
            return gearnet.tiny_gearnet(seed=0).to(device).eval()
        if not cfg.gearnet_ckpt:
            raise FatalError("real structure features need --gearnet-ckpt PATH (GearNet-Edge weights such as "
                             "mc_gearnet_edge.pth from the GearNet repository)" + TINY_HINT)
        try:
            model = gearnet.GearNetEdge.from_state_dict(gearnet_state_dict(cfg.gearnet_ckpt))
        except Exception as e:
            raise FatalError(f"could not load GearNet-Edge from {cfg.gearnet_ckpt}: {type(e).__name__}: "
                             f"{full_reason(e)} -- fix: pass --gearnet-ckpt PATH of a GearNet-Edge state_dict "
                             "(plain, torchdrug solver {'model': ...} or DDP)" + TINY_HINT) from None
        return model.to(device).eval()
    if tiny:
        from transformers import BertConfig, BertModel, BertTokenizerFast
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "vocab.txt").write_text("\n".join(tiny_vocab()) + "\n")
            tokenizer = BertTokenizerFast.from_pretrained(tmp, do_lower_case=True)
        config = BertConfig(vocab_size=len(tokenizer), hidden_size=48, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=96, max_position_embeddings=512)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = BertModel(config, add_pooling_layer=False)
        return TextEncoder(tokenizer, model, device, precision)
    try:
        tokenizer, model = load_text_model(cfg.text_model)
    except Exception as e:  # no network, missing cache, corrupt file: all end the run the same way
        raise FatalError(f"could not load the text model {cfg.text_model}: {type(e).__name__}: {full_reason(e)} "
                         f"-- fix: {text_fix(cfg)}{TINY_HINT}") from None
    return TextEncoder(tokenizer, model, device, precision)


# ----------------------------------------------------------------------------- proteins and their files


# ----------------------------------------------------------------------------- encoder precision

def resolve_precision(precision, device):
    """--precision as run on `device` ('auto' allowed): auto is bf16 on CUDA, fp32 on the CPU; tf32 off CUDA is fp32."""
    kind = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if str(device) == "auto" else device).type
    if precision == "auto":
        return "bf16" if kind == "cuda" else "fp32"
    return "fp32" if precision == "tf32" and kind != "cuda" else precision


class tf32_matmuls:
    """TF32 for CUDA matmuls and convolutions inside the block; the previous settings restored after."""

    def __enter__(self):
        self.saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved


def forward_precision(precision, device):
    """The context an encoder's forward pass runs in: bf16 autocast, TF32 matmuls, or nothing (exact fp32)."""
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return tf32_matmuls() if precision == "tf32" else contextlib.nullcontext()


def structure_precision(precision, device):
    """GearNet-Edge's precision: as asked, except bf16 becomes TF32 (fp32 off CUDA): its relational aggregation is a
    sparse CSR product, which has no bf16 kernel on the CPU and is not verified in bf16 on CUDA here."""
    precision = resolve_precision(precision, device)
    return resolve_precision("tf32", device) if precision == "bf16" else precision


def with_precision(precision, device, fn, *args):
    with forward_precision(precision, device):
        return fn(*args)
