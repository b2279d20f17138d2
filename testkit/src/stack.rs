//! The deployment template's IAM policies, rendered as CloudFormation would render them for
//! given parameters (`!Ref`, `!Sub`, `!GetAtt`, `!If` and the conditions): what a test loads
//! into a server that evaluates IAM policies, to run every command under the grants of the
//! role that runs it in the stack.

use std::collections::BTreeMap;

use anyhow::{Context, anyhow, bail};
use serde_json::Value as Json;
use serde_yaml_ng::Value as Yaml;

/// The account and region the rendered ARNs name (MiniStack's defaults).
pub const ACCOUNT: &str = "000000000000";
pub const REGION: &str = "us-east-1";

/// A template and the values its intrinsic functions resolve to.
pub struct Stack {
    template: Yaml,
    /// Every parameter: its default, or the value given.
    parameters: BTreeMap<String, String>,
    /// `!Ref` and `!GetAtt` (`Name.Attribute`) of the resources a policy names.
    resources: BTreeMap<String, String>,
    stack_name: String,
}

impl Stack {
    /// Reads `path`; `parameters` override the defaults, `resources` give the values of
    /// `!Ref Resource` and `!GetAtt Resource.Attribute` (e.g. `Queue.Arn`).
    pub fn load(
        path: &std::path::Path,
        stack_name: &str,
        parameters: &[(&str, &str)],
        resources: &[(&str, &str)],
    ) -> anyhow::Result<Stack> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let template: Yaml = serde_yaml_ng::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let mut values = BTreeMap::new();
        if let Some(Yaml::Mapping(declared)) = template.get("Parameters") {
            for (name, spec) in declared {
                let name = name.as_str().ok_or_else(|| anyhow!("a parameter name is not a string"))?;
                if let Some(default) = spec.get("Default") {
                    values.insert(name.to_owned(), scalar(default)?);
                }
            }
        }
        for (name, value) in parameters {
            anyhow::ensure!(
                template.get("Parameters").and_then(|p| p.get(*name)).is_some(),
                "the template has no parameter {name}"
            );
            values.insert((*name).to_owned(), (*value).to_owned());
        }
        let resources = resources.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        Ok(Stack { template, parameters: values, resources, stack_name: stack_name.to_owned() })
    }

    /// The inline policies of an `AWS::IAM::Role` resource, by name, as IAM would store them.
    pub fn role_policies(&self, role: &str) -> anyhow::Result<Vec<(String, Json)>> {
        let resource = self.template["Resources"].get(role).ok_or_else(|| anyhow!("no resource {role}"))?;
        anyhow::ensure!(resource["Type"].as_str() == Some("AWS::IAM::Role"), "{role} is not an AWS::IAM::Role");
        let Some(policies) = self.resolve(&resource["Properties"]["Policies"])? else { return Ok(Vec::new()) };
        let policies = policies.as_array().ok_or_else(|| anyhow!("{role}'s Policies is not a list"))?;
        policies
            .iter()
            .map(|p| {
                let name = p["PolicyName"].as_str().ok_or_else(|| anyhow!("a policy of {role} has no name"))?;
                Ok((name.to_owned(), p["PolicyDocument"].clone()))
            })
            .collect()
    }

    /// A resource as CloudFormation would create it (`Type`, `Properties` rendered); `None`
    /// when its `Condition` does not hold, an error when the template has no such resource.
    pub fn resource(&self, name: &str) -> anyhow::Result<Option<Json>> {
        let resource = self.template["Resources"].get(name).ok_or_else(|| anyhow!("no resource {name}"))?;
        if let Some(condition) = resource.get("Condition").and_then(Yaml::as_str)
            && !self.condition(condition)?
        {
            return Ok(None);
        }
        self.resolve(resource)
    }

    /// A parameter's value: the one given, or its default.
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.parameters.get(name).map(String::as_str)
    }

    /// Whether a condition of the template holds.
    pub fn condition(&self, name: &str) -> anyhow::Result<bool> {
        let body = self.template["Conditions"].get(name).ok_or_else(|| anyhow!("no condition {name}"))?;
        match self.resolve(body)? {
            Some(Json::Bool(holds)) => Ok(holds),
            other => bail!("condition {name} is {other:?}, not a boolean"),
        }
    }

    /// A value with every intrinsic function resolved; `None` for `AWS::NoValue` (the key or
    /// list item is then left out).
    fn resolve(&self, value: &Yaml) -> anyhow::Result<Option<Json>> {
        Ok(Some(match value {
            Yaml::Null => Json::Null,
            Yaml::Bool(b) => Json::Bool(*b),
            Yaml::Number(n) => serde_json::to_value(n)?,
            Yaml::String(s) => Json::String(s.clone()),
            Yaml::Sequence(items) => Json::Array(
                items.iter().map(|i| self.resolve(i)).filter_map(Result::transpose).collect::<Result<_, _>>()?,
            ),
            Yaml::Mapping(map) => {
                // The long form of a function: `{Fn::If: [...]}`, `{Ref: X}`.
                if map.len() == 1
                    && let Some((Yaml::String(key), arg)) = map.iter().next()
                    && (key == "Ref" || key.starts_with("Fn::") || key == "Condition")
                {
                    return self.function(key.trim_start_matches("Fn::"), arg);
                }
                let mut out = serde_json::Map::new();
                for (k, v) in map {
                    let k = k.as_str().ok_or_else(|| anyhow!("a key is not a string: {k:?}"))?;
                    if let Some(v) = self.resolve(v)? {
                        out.insert(k.to_owned(), v);
                    }
                }
                Json::Object(out)
            }
            Yaml::Tagged(tagged) => {
                let tag = tagged.tag.to_string();
                return self.function(tag.trim_start_matches('!'), &tagged.value);
            }
        }))
    }

    fn function(&self, name: &str, arg: &Yaml) -> anyhow::Result<Option<Json>> {
        let args = |n: usize| -> anyhow::Result<&Vec<Yaml>> {
            match arg {
                Yaml::Sequence(items) if items.len() == n => Ok(items),
                _ => bail!("{name} takes {n} arguments: {arg:?}"),
            }
        };
        let boolean = |v: &Yaml| -> anyhow::Result<bool> {
            match self.resolve(v)? {
                Some(Json::Bool(b)) => Ok(b),
                other => bail!("{name}: {other:?} is not a condition"),
            }
        };
        Ok(Some(match name {
            "Ref" => {
                let target = arg.as_str().ok_or_else(|| anyhow!("Ref of {arg:?}"))?;
                if target == "AWS::NoValue" {
                    return Ok(None);
                }
                Json::String(self.name(target)?)
            }
            "GetAtt" => {
                let target = match arg {
                    Yaml::String(s) => s.clone(),
                    Yaml::Sequence(parts) => {
                        parts.iter().map(|p| p.as_str().unwrap_or_default()).collect::<Vec<_>>().join(".")
                    }
                    _ => bail!("GetAtt of {arg:?}"),
                };
                Json::String(self.name(&target)?)
            }
            "Sub" => {
                let (text, locals) = match arg {
                    Yaml::String(s) => (s.as_str(), None),
                    Yaml::Sequence(items) if items.len() == 2 => {
                        (items[0].as_str().ok_or_else(|| anyhow!("Sub of {arg:?}"))?, Some(&items[1]))
                    }
                    _ => bail!("Sub of {arg:?}"),
                };
                Json::String(self.substitute(text, locals)?)
            }
            "If" => {
                let items = args(3)?;
                let holds = self.condition(items[0].as_str().ok_or_else(|| anyhow!("If of {arg:?}"))?)?;
                return self.resolve(&items[if holds { 1 } else { 2 }]);
            }
            "Condition" => Json::Bool(self.condition(arg.as_str().ok_or_else(|| anyhow!("Condition of {arg:?}"))?)?),
            "Equals" => {
                let items = args(2)?;
                let (a, b) = (self.resolve(&items[0])?, self.resolve(&items[1])?);
                Json::Bool(text(a.as_ref()) == text(b.as_ref()))
            }
            "Not" => Json::Bool(!boolean(&args(1)?[0])?),
            "And" | "Or" => {
                let items = arg.as_sequence().ok_or_else(|| anyhow!("{name} of {arg:?}"))?;
                let values = items.iter().map(boolean).collect::<anyhow::Result<Vec<_>>>()?;
                Json::Bool(if name == "And" { values.iter().all(|v| *v) } else { values.iter().any(|v| *v) })
            }
            "Join" => {
                let items = args(2)?;
                let separator = items[0].as_str().unwrap_or_default();
                let parts = self.resolve(&items[1])?.unwrap_or(Json::Array(Vec::new()));
                let parts = parts.as_array().ok_or_else(|| anyhow!("Join of {arg:?}"))?;
                Json::String(parts.iter().map(|p| text(Some(p))).collect::<Vec<_>>().join(separator))
            }
            other => bail!("the renderer does not know Fn::{other}"),
        }))
    }

    /// `${Name}` in a `!Sub` string: a local of the `!Sub`, a parameter, a pseudo parameter,
    /// or a resource (`Name.Attribute` for an attribute).
    fn substitute(&self, text: &str, locals: Option<&Yaml>) -> anyhow::Result<String> {
        let mut out = String::new();
        let mut rest = text;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let end = rest[start..].find('}').ok_or_else(|| anyhow!("unclosed ${{ in {text:?}"))? + start;
            let name = &rest[start + 2..end];
            match locals.and_then(|l| l.get(name)) {
                Some(local) => out.push_str(&text_of(self.resolve(local)?)),
                None => out.push_str(&self.name(name)?),
            }
            rest = &rest[end + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }

    /// The value a name stands for: a parameter, a pseudo parameter or a resource.
    fn name(&self, name: &str) -> anyhow::Result<String> {
        match name {
            "AWS::Partition" => return Ok("aws".to_owned()),
            "AWS::Region" => return Ok(REGION.to_owned()),
            "AWS::AccountId" => return Ok(ACCOUNT.to_owned()),
            "AWS::StackName" => return Ok(self.stack_name.clone()),
            "AWS::URLSuffix" => return Ok("amazonaws.com".to_owned()),
            _ => {}
        }
        if let Some(value) = self.parameters.get(name) {
            return Ok(value.clone());
        }
        if let Some(value) = self.resources.get(name) {
            return Ok(value.clone());
        }
        bail!("{name} has no value: a parameter without a default, or a resource the test did not name")
    }
}

fn scalar(value: &Yaml) -> anyhow::Result<String> {
    Ok(match value {
        Yaml::String(s) => s.clone(),
        Yaml::Number(n) => n.to_string(),
        Yaml::Bool(b) => b.to_string(),
        other => bail!("{other:?} is not a scalar"),
    })
}

fn text(value: Option<&Json>) -> String {
    match value {
        Some(Json::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => String::new(),
    }
}

fn text_of(value: Option<Json>) -> String {
    text(value.as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/avatar-migration.yaml")
    }

    fn stack(parameters: &[(&str, &str)]) -> Stack {
        let resources = [
            ("Queue", "http://sqs/q"),
            ("Queue.Arn", "arn:aws:sqs:us-east-1:000000000000:q"),
            ("DeadLetterQueue.Arn", "arn:aws:sqs:us-east-1:000000000000:q-dlq"),
        ];
        let mut all = vec![("DatabaseSecretArn", "arn:aws:secretsmanager:us-east-1:000000000000:secret:db")];
        all.extend_from_slice(parameters);
        Stack::load(&template(), "q", &all, &resources).unwrap()
    }

    #[test]
    fn conditions_and_substitutions_render_as_cloudformation_would() {
        let off = stack(&[]);
        assert!(!off.condition("CleanupEnabled").unwrap());
        let policies = serde_json::to_string(&off.role_policies("FeederTaskRole").unwrap()).unwrap();
        assert!(policies.contains("arn:aws:s3:::legacy-s3/image/*"), "{policies}");
        assert!(!policies.contains("CleanupLegacy"), "a grant behind a false condition is left out: {policies}");
        assert!(!policies.contains("${"), "every substitution is made: {policies}");

        let on = stack(&[("EnableLegacyCleanup", "true"), ("ConsumerDeleteSource", "true")]);
        assert!(on.condition("DeleteSourceEnabled").unwrap());
        let policies = serde_json::to_string(&on.role_policies("ConsumerTaskRole").unwrap()).unwrap();
        assert!(policies.contains("DeleteMovedSources"), "{policies}");
    }

    #[test]
    fn a_name_without_a_value_is_an_error_not_an_empty_string() {
        let s = Stack::load(&template(), "q", &[], &[]).unwrap();
        let err = s.role_policies("ConsumerTaskRole").unwrap_err().to_string();
        assert!(err.contains("has no value"), "{err}");
    }
}
