"""Reference records every Gatehouse ships with: licences, compute thresholds, risk frameworks.

Loaded by a data migration and kept as data: administrators edit them in the admin when law or
policy changes; no code change needed. Texts are paraphrased summaries with links to the originals
(see shared/reference/governance-domain.md for sources).
"""

LICENSES = [
    {"key": "apache-2.0", "name": "Apache License 2.0", "version": "2.0",
     "url": "https://www.apache.org/licenses/LICENSE-2.0", "osi_approved": True, "commercial_use": True,
     "attribution_required": True, "attribution_text": "Keep the licence and NOTICE file; mark changed files.",
     "text": "Permissive licence with a patent grant. Redistribution must keep the licence, the NOTICE file and "
             "mark changes. Full text: https://www.apache.org/licenses/LICENSE-2.0"},
    {"key": "mit", "name": "MIT License", "url": "https://opensource.org/license/mit", "osi_approved": True,
     "commercial_use": True, "attribution_required": True,
     "attribution_text": "Keep the copyright and permission notice.",
     "text": "Permissive licence: use, copy, modify, merge, publish, distribute, sublicense and sell, provided the "
             "copyright and permission notice are kept. Full text: https://opensource.org/license/mit"},
    {"key": "cc-by-4.0", "name": "Creative Commons Attribution 4.0", "version": "4.0",
     "url": "https://creativecommons.org/licenses/by/4.0/", "commercial_use": True, "attribution_required": True,
     "attribution_text": "Credit the creator, link the licence, indicate changes.",
     "text": "Share and adapt for any purpose with attribution. Full text: https://creativecommons.org/licenses/by/4.0/legalcode"},
    {"key": "cc-by-nc-4.0", "name": "Creative Commons Attribution-NonCommercial 4.0", "version": "4.0",
     "url": "https://creativecommons.org/licenses/by-nc/4.0/", "commercial_use": False,
     "attribution_required": True, "use_restrictions": "Non-commercial use only.",
     "attribution_text": "Credit the creator, link the licence, indicate changes.",
     "text": "Share and adapt for non-commercial purposes with attribution. "
             "Full text: https://creativecommons.org/licenses/by-nc/4.0/legalcode"},
    {"key": "PSF-2.0", "name": "Python Software Foundation License 2.0", "version": "2.0",
     "url": "https://docs.python.org/3/license.html", "osi_approved": True, "commercial_use": True,
     "attribution_required": True, "attribution_text": "Keep the PSF copyright notice and licence.",
     "text": "Permissive licence of the Python standard library; derived works must retain the PSF notice. "
             "Full text: https://docs.python.org/3/license.html"},
    {"key": "openrail", "name": "Open RAIL", "url": "https://www.licenses.ai/", "commercial_use": True,
     "use_restrictions": "Use-based restrictions in the licence attachment.", "restrictions_inherited": True,
     "attribution_required": True, "text": "Responsible AI licence family: open access with use-based restrictions "
     "that every derivative must carry as enforceable terms. See https://huggingface.co/blog/open_rail"},
    {"key": "bigscience-openrail-m", "name": "BigScience OpenRAIL-M",
     "url": "https://bigscience.huggingface.co/blog/bigscience-openrail-m", "commercial_use": True,
     "use_restrictions": "Attachment A use restrictions.", "restrictions_inherited": True,
     "attribution_required": True, "text": "OpenRAIL-M licence of the BLOOM family; Attachment A lists prohibited uses, "
     "which derivatives must pass on."},
    {"key": "llama2", "name": "Llama 2 Community License", "version": "2023-07-18",
     "url": "https://ai.meta.com/llama/license/", "commercial_use": True, "attribution_required": True,
     "restrictions_inherited": True, "aup_url": "https://ai.meta.com/llama/use-policy/",
     "use_restrictions": "Acceptable Use Policy; a separate licence above 700 million monthly active users; "
                         "outputs may not be used to improve other large language models.",
     "text": "Community licence for Llama 2. Redistribution under the same terms with the licence and notice. "
             "Full text: https://ai.meta.com/llama/license/"},
    {"key": "llama3.1", "name": "Llama 3.1 Community License", "version": "2024-07-23",
     "url": "https://www.llama.com/llama3_1/license/", "commercial_use": True, "attribution_required": True,
     "attribution_text": "Built with Llama", "restrictions_inherited": True,
     "aup_url": "https://www.llama.com/llama3_1/use-policy/",
     "use_restrictions": "Acceptable Use Policy; a separate licence above 700 million monthly active users; derived "
                         "model names must begin with 'Llama'.",
     "text": "Community licence for Llama 3.1; outputs may be used to train other models. "
             "Full text: https://www.llama.com/llama3_1/license/"},
    {"key": "gemma", "name": "Gemma Terms of Use", "url": "https://ai.google.dev/gemma/terms",
     "commercial_use": True, "attribution_required": True, "restrictions_inherited": True,
     "aup_url": "https://ai.google.dev/gemma/prohibited_use_policy",
     "use_restrictions": "Prohibited Use Policy; restrictions bind recipients; distilled models are Model Derivatives.",
     "text": "Terms of use for Gemma models. Full text: https://ai.google.dev/gemma/terms"},
]

DESIGNATION_THRESHOLDS = [
    {"key": "eu-gpai", "name": "EU general-purpose AI model (indicative)",
     "instrument": "EU AI Act Art. 3(63); Commission GPAI guidelines of 18 Jul 2025", "min_flops": 1e23,
     "basis": "cumulative", "effective_from": "2025-08-02",
     "consequence": "Art. 53 duties: technical documentation, downstream information, copyright policy, public "
                    "training-content summary (open-source exemption for the first two).",
     "source_url": "https://artificialintelligenceact.eu/annex/11"},
    {"key": "eu-systemic-risk", "name": "EU GPAI model with systemic risk (presumed)",
     "instrument": "EU AI Act Art. 51(2)", "min_flops": 1e25, "basis": "cumulative", "effective_from": "2025-08-02",
     "consequence": "Notify the Commission within two weeks (Art. 52); Art. 55 duties: state-of-the-art evaluation "
                    "with adversarial testing, risk mitigation, incident reporting, cybersecurity.",
     "source_url": "https://ai-act-law.eu/article/51/"},
    {"key": "ca-frontier", "name": "California frontier model",
     "instrument": "California SB 53, Transparency in Frontier AI Act", "min_flops": 1e26, "basis": "cumulative",
     "effective_from": "2026-01-01",
     "consequence": "Frontier AI framework (large developers), transparency report before deployment, critical "
                    "safety incident reporting within 15 days.",
     "source_url": "https://leginfo.legislature.ca.gov/faces/billTextClient.xhtml?bill_id=202520260SB53"},
]

_OPENAI_LEVELS = [
    {"key": "high", "name": "High", "rank": 1, "description": "Could amplify existing pathways to severe harm.",
     "required_safeguards": "Deploy only once safeguards sufficiently minimise the risk."},
    {"key": "critical", "name": "Critical", "rank": 2,
     "description": "Could introduce unprecedented new pathways to severe harm.",
     "required_safeguards": "Safeguards required during development as well as deployment."},
]

RISK_FRAMEWORKS = [
    {"key": "openai-preparedness", "name": "OpenAI Preparedness Framework", "publisher": "OpenAI", "version": "2",
     "published_on": "2025-04-15", "source_url": "https://openai.com/index/updating-our-preparedness-framework/",
     "domains": [
         {"key": "biological-chemical", "name": "Biological and Chemical", "category": "tracked", "thresholds": _OPENAI_LEVELS},
         {"key": "cybersecurity", "name": "Cybersecurity", "category": "tracked", "thresholds": _OPENAI_LEVELS},
         {"key": "ai-self-improvement", "name": "AI Self-improvement", "category": "tracked", "thresholds": _OPENAI_LEVELS},
         {"key": "long-range-autonomy", "name": "Long-range Autonomy", "category": "research", "thresholds": _OPENAI_LEVELS},
         {"key": "sandbagging", "name": "Sandbagging", "category": "research", "thresholds": _OPENAI_LEVELS},
         {"key": "autonomous-replication", "name": "Autonomous Replication and Adaptation", "category": "research",
          "thresholds": _OPENAI_LEVELS},
         {"key": "undermining-safeguards", "name": "Undermining Safeguards", "category": "research", "thresholds": _OPENAI_LEVELS},
         {"key": "nuclear-radiological", "name": "Nuclear and Radiological", "category": "research", "thresholds": _OPENAI_LEVELS},
     ]},
    {"key": "anthropic-rsp", "name": "Anthropic Responsible Scaling Policy", "publisher": "Anthropic", "version": "2.2",
     "published_on": "2025-05-14", "source_url": "https://www.anthropic.com/news/announcing-our-updated-responsible-scaling-policy",
     "domains": [
         {"key": "cbrn", "name": "CBRN weapons", "category": "tracked", "thresholds": [
             {"key": "cbrn-3", "name": "CBRN-3", "rank": 1, "required_safeguards": "ASL-3 Deployment and Security Standards",
              "description": "Significant help to individuals with a basic technical background to create or deploy CBRN weapons."},
             {"key": "cbrn-4", "name": "CBRN-4", "rank": 2, "required_safeguards": "ASL-4 (to be specified)",
              "description": "Substantial uplift to moderately resourced state programmes."}]},
         {"key": "ai-rnd", "name": "Autonomous AI research and development", "category": "tracked", "thresholds": [
             {"key": "ai-rnd-4", "name": "AI R&D-4", "rank": 1,
              "required_safeguards": "ASL-3 Security plus an affirmative case on misalignment risk",
              "description": "Can fully automate the work of an entry-level, remote-only researcher."},
             {"key": "ai-rnd-5", "name": "AI R&D-5", "rank": 2, "required_safeguards": "At least ASL-4 Security",
              "description": "Can cause dramatic acceleration in the rate of effective scaling."}]},
         {"key": "cyber", "name": "Cyber operations", "category": "research", "thresholds": [
             {"key": "cyber-monitored", "name": "Monitored capability", "rank": 1,
              "max_tier_unmitigated": "api", "max_tier_with_safeguards": "open",
              "description": "Watched for; no fixed required safeguard."}]},
     ]},
    {"key": "gdm-fsf", "name": "Google DeepMind Frontier Safety Framework", "publisher": "Google DeepMind",
     "version": "3", "published_on": "2025-09-22",
     "source_url": "https://deepmind.google/blog/strengthening-our-frontier-safety-framework/",
     "domains": [
         {"key": "cbrn", "name": "CBRN (misuse)", "category": "tracked", "thresholds": [
             {"key": "cbrn-uplift-1", "name": "CBRN uplift level 1", "rank": 1,
              "description": "Meaningful assistance to a low-resourced actor towards a mass-casualty CBRN event."}]},
         {"key": "cyber", "name": "Cyber (misuse)", "category": "tracked", "thresholds": [
             {"key": "cyber-uplift-1", "name": "Cyber uplift level 1", "rank": 1,
              "description": "Substantial uplift for high-impact cyber attacks."},
             {"key": "cyber-autonomy-1", "name": "Cyber autonomy level 1", "rank": 2,
              "description": "Can fully automate opportunistic cyber attacks."}]},
         {"key": "harmful-manipulation", "name": "Harmful manipulation (misuse)", "category": "tracked", "thresholds": [
             {"key": "harmful-manipulation-1", "name": "Harmful manipulation level 1", "rank": 1,
              "description": "Can systematically and substantially change beliefs and behaviour in high-stakes contexts."}]},
         {"key": "ml-rnd", "name": "Machine-learning R&D", "category": "tracked", "thresholds": [
             {"key": "ml-rnd-acceleration-1", "name": "ML R&D acceleration level 1", "rank": 1,
              "description": "Can significantly accelerate AI development."},
             {"key": "ml-rnd-automation-1", "name": "ML R&D automation level 1", "rank": 2,
              "description": "Can fully automate the AI R&D pipeline at competitive cost."}]},
         {"key": "misalignment", "name": "Misalignment (instrumental reasoning)", "category": "research", "thresholds": [
             {"key": "instrumental-reasoning-1", "name": "Instrumental reasoning level 1", "rank": 1,
              "description": "Enough situational awareness to undermine human control, absent mitigations."},
             {"key": "instrumental-reasoning-2", "name": "Instrumental reasoning level 2", "rank": 2,
              "description": "Can undermine control even with additional mitigations."}]},
     ]},
]


def _known(model, row: dict) -> dict:
    """Only the fields the (possibly historical, in a migration) model has."""
    names = {f.name for f in model._meta.get_fields()}
    return {k: v for k, v in row.items() if k in names}


def max_tiers(threshold: dict) -> dict:
    """Release ceilings for a capability level, unless the data says otherwise: the first level of a domain
    may ship API-only behind its safeguards; anything higher stays closed."""
    return {"max_tier_unmitigated": threshold.get("max_tier_unmitigated", "closed"),
            "max_tier_with_safeguards": threshold.get("max_tier_with_safeguards",
                                                      "api" if threshold["rank"] == 1 else "closed")}


def load_reference_data(apps) -> None:
    """Idempotent upsert of the records above; `apps` is a migration's app registry (or django.apps)."""
    import hashlib

    License = apps.get_model("registry", "License")
    for row in LICENSES:
        row = dict(row)
        row.setdefault("text_sha256", hashlib.sha256(row.get("text", "").encode()).hexdigest())
        License.objects.update_or_create(key=row.pop("key"), defaults=_known(License, row))

    Threshold = apps.get_model("registry", "DesignationThreshold")
    for row in DESIGNATION_THRESHOLDS:
        row = dict(row)
        Threshold.objects.update_or_create(key=row.pop("key"), defaults=_known(Threshold, row))

    Framework = apps.get_model("registry", "RiskFramework")
    Domain = apps.get_model("registry", "RiskDomain")
    RiskThreshold = apps.get_model("registry", "RiskThreshold")
    for spec in RISK_FRAMEWORKS:
        spec = dict(spec)
        domains = spec.pop("domains")
        framework, _ = Framework.objects.update_or_create(key=spec.pop("key"), version=spec.pop("version"), defaults=spec)
        for domain_spec in domains:
            domain_spec = dict(domain_spec)
            thresholds = domain_spec.pop("thresholds")
            domain, _ = Domain.objects.update_or_create(framework=framework, key=domain_spec.pop("key"),
                                                        defaults=domain_spec)
            for threshold in thresholds:
                threshold = dict(threshold) | max_tiers(threshold)
                RiskThreshold.objects.update_or_create(domain=domain, key=threshold.pop("key"),
                                                       defaults=_known(RiskThreshold, threshold))
