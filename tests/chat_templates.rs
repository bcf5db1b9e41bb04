//! Chat templates render byte for byte as transformers renders them: every template in
//! tests/fixtures/templates (the real llava-interleave one, llava-1.5, llava-onevision,
//! Llama 3.2 Instruct, Qwen3 with generation tags) on every conversation of refs.json, made by
//! make_template_refs.py with transformers 5.24 (strftime_now fixed at 2024-07-26 13:05:09).

use cmrm::chat_template::{ChatTemplate, CivilTime};
use minijinja::Value;

fn fixed_time() -> CivilTime {
    CivilTime { year: 2024, month: 7, day: 26, hour: 13, minute: 5, second: 9 }
}

fn refs() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/templates/refs.json");
    // Deserialized into minijinja values, which keep each object's key order (as Python dicts).
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn text(v: &Value) -> String {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v}")).to_owned()
}

#[test]
fn every_template_renders_as_transformers_does() {
    let refs = refs();
    let templates = refs.get_attr("templates").unwrap();
    let cases: Vec<Value> = refs.get_attr("cases").unwrap().try_iter().unwrap().collect();
    assert!(cases.len() >= 25, "{} cases", cases.len());
    let mut failures = Vec::new();
    let (mut rendered, mut errors) = (0, 0);
    for case in &cases {
        let name = text(&case.get_attr("template").unwrap());
        let label = format!("{name} / {}", text(&case.get_attr("case").unwrap()));
        let source = text(&templates.get_attr(&name).unwrap());
        let template = ChatTemplate::with_clock(&source, fixed_time).unwrap_or_else(|e| panic!("{label}: {e:#}"));
        let variables: Vec<(String, Value)> = case
            .get_attr("variables")
            .unwrap()
            .try_iter()
            .unwrap()
            .map(|k| (text(&k), case.get_attr("variables").unwrap().get_item(&k).unwrap()))
            .collect();
        let gen = case.get_attr("add_generation_prompt").unwrap().is_true();
        let got = template.render(&case.get_attr("messages").unwrap(), gen, &variables);
        let expected = case.get_attr("expected").unwrap();
        match (got, expected.is_undefined()) {
            (Ok(out), false) => {
                rendered += 1;
                if out != text(&expected) {
                    failures.push(format!("{label}:\n  got      {out:?}\n  expected {:?}", text(&expected)));
                }
            }
            (Err(e), true) => {
                errors += 1;
                // A raise_exception message must reach the user as the template wrote it; other
                // failures (Jinja's own, worded differently) must only be failures.
                let want = text(&case.get_attr("error").unwrap());
                let msg = format!("{e:#}");
                if case.get_attr("raised_by_template").unwrap().is_true() && !msg.contains(&want) {
                    failures.push(format!("{label}: error {msg:?} does not carry the template's {want:?}"));
                }
            }
            (Ok(out), true) => failures.push(format!("{label}: rendered {out:?}, transformers raised")),
            (Err(e), false) => failures.push(format!("{label}: {e:#}")),
        }
    }
    assert!(failures.is_empty(), "{} of {} cases differ:\n{}", failures.len(), cases.len(), failures.join("\n"));
    assert!(rendered >= 25 && errors >= 3, "{rendered} rendered, {errors} errors");
}

#[test]
fn a_broken_template_is_an_error_that_names_the_problem() {
    let err = ChatTemplate::new("{% for m in messages %}{{ m.role }").err().expect("parse error");
    assert!(format!("{err:#}").contains("does not parse"), "{err:#}");
    // Templates that would allocate gigabytes are stopped, each with a message.
    for (template, says) in [
        ("{{ '%999999999s'|format('x') }}", "field width"),
        ("{{ '{:>999999999}'.format('x') }}", "field width"),
        ("{{ 'x'|indent(999999999, true) }}", "indent wider"),
        ("{{ 'x' * 200000000 }}", "too large"),
        ("{% for i in range(2000) %}{{ 'y' * 10000 }}{% endfor %}", "MiB limit"),
        // 100 GB if it were all written (a fuzzed template wrote 3 GB before the cap was a
        // limit on writing): stopped after the first 4 MiB.
        ("{% for i in range(100000) %}{{ 'y' * 1000000 }}{% endfor %}", "MiB limit"),
    ] {
        let t = ChatTemplate::new(template).unwrap();
        let err = t.render(&Value::from(Vec::<Value>::new()), true, &[]).unwrap_err();
        assert!(format!("{err:#}").contains(says), "{template}: {err:#}");
    }
    let endless = ChatTemplate::new("{% for a in range(10000) %}{% for b in range(10000) %}{% for c in range(10000) %}x{% endfor %}{% endfor %}{% endfor %}").unwrap();
    let err = endless.render(&Value::from(Vec::<Value>::new()), true, &[]).unwrap_err();
    assert!(format!("{err:#}").contains("budget"), "{err:#}");
}
