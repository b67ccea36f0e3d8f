//! A task's hostname from its service's `--hostname`, which swarm takes as a Go template
//! (`{{.Node.Hostname}}-{{.Service.Name}}-{{.Task.Slot}}`) and expands on the task's node.
//! meshd on another node never sees the expanded value, so it expands the same fields
//! itself. Only plain field references are supported: anything else (functions, pipelines,
//! labels) is an error for that one task, which then keeps its other names.
use thiserror::Error;

/// The fields swarm's template context offers for a task (swarmkit `template.Context`).
#[derive(Debug, Clone, Default)]
pub struct TaskContext<'a> {
    pub service_id: &'a str,
    pub service_name: &'a str,
    pub node_id: &'a str,
    /// Unknown when the node is not in the node list.
    pub node_hostname: Option<&'a str>,
    pub task_id: &'a str,
    pub task_name: &'a str,
    /// The slot, or the node id for a global service's task (as swarm does).
    pub task_slot: &'a str,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum TemplateError {
    #[error("`{{{{` without a closing `}}}}`")]
    Unclosed,
    #[error("`{{{{{0}}}}}` is not a field meshd can expand")]
    Unsupported(String),
    #[error("the node's hostname is not known")]
    NoNodeHostname,
}

pub fn expand(template: &str, ctx: &TaskContext) -> Result<String, TemplateError> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find("{{") {
        out.push_str(&rest[..open]);
        let after = &rest[open + 2..];
        let close = after.find("}}").ok_or(TemplateError::Unclosed)?;
        let field = after[..close].trim();
        out.push_str(match field {
            ".Service.ID" => ctx.service_id,
            ".Service.Name" => ctx.service_name,
            ".Node.ID" => ctx.node_id,
            ".Node.Hostname" => ctx.node_hostname.ok_or(TemplateError::NoNodeHostname)?,
            ".Task.ID" => ctx.task_id,
            ".Task.Name" => ctx.task_name,
            ".Task.Slot" => ctx.task_slot,
            other => return Err(TemplateError::Unsupported(other.to_string())),
        });
        rest = &after[close + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> TaskContext<'static> {
        TaskContext {
            service_id: "svc1",
            service_name: "web",
            node_id: "node9",
            node_hostname: Some("worker2"),
            task_id: "t7",
            task_name: "web.3.t7",
            task_slot: "3",
        }
    }

    #[test]
    fn plain_fields_expand_and_text_stays() {
        let c = ctx();
        assert_eq!(
            expand("{{.Node.Hostname}}-{{ .Service.Name }}-{{.Task.Slot}}", &c).unwrap(),
            "worker2-web-3"
        );
        assert_eq!(
            expand(
                "x{{.Task.Name}}{{.Task.ID}}.{{.Node.ID}}{{.Service.ID}}",
                &c
            )
            .unwrap(),
            "xweb.3.t7t7.node9svc1"
        );
        assert_eq!(expand("db-primary", &c).unwrap(), "db-primary");
        assert_eq!(expand("", &c).unwrap(), "");
    }

    #[test]
    fn what_cannot_be_expanded_is_an_error_not_a_guess() {
        let c = ctx();
        assert_eq!(expand("a{{.Task.Slot", &c), Err(TemplateError::Unclosed));
        assert_eq!(
            expand("{{index .Service.Labels \"x\"}}", &c),
            Err(TemplateError::Unsupported(
                "index .Service.Labels \"x\"".into()
            ))
        );
        assert_eq!(
            expand("{{.Node.Platform.OS}}", &c),
            Err(TemplateError::Unsupported(".Node.Platform.OS".into()))
        );
        let unknown_node = TaskContext {
            node_hostname: None,
            ..ctx()
        };
        assert_eq!(
            expand("{{.Node.Hostname}}", &unknown_node),
            Err(TemplateError::NoNodeHostname)
        );
    }
}
