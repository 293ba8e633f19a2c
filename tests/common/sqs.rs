//! SQS fixtures: the suite's moto server, raw clients for the server's own attributes, and
//! moto servers of a test's own, killed and restarted for the fault cases.
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::celery::python;
use super::process::{free_port, ChildGuard};
use super::process::{wait_listening, which};

// SQS

/// The suite's SQS-compatible endpoint (`CKS_SQS_ENDPOINT`, a moto server), checked to answer.
pub fn sqs_endpoint() -> (String, u16) {
    let endpoint = std::env::var("CKS_SQS_ENDPOINT").unwrap_or_else(|_| {
        panic!("CKS_SQS_ENDPOINT is not set: run the suite with scripts/test.sh, which starts a moto server")
    });
    let url = url::Url::parse(&endpoint).expect("CKS_SQS_ENDPOINT is a URL");
    let host = url.host_str().unwrap_or("127.0.0.1").to_string();
    let port = url.port().unwrap_or(80);
    std::net::TcpStream::connect((host.as_str(), port))
        .unwrap_or_else(|e| panic!("no SQS server at {endpoint} ({e}): run scripts/test.sh"));
    (host, port)
}

/// `sqs://testing:testing@host:port`, as Celery (kombu) spells a local endpoint.
pub fn sqs_broker_url() -> String {
    let (host, port) = sqs_endpoint();
    format!("sqs://testing:testing@{host}:{port}")
}

/// A raw SQS client for checking the server's own attributes.
pub async fn raw_sqs() -> aws_sdk_sqs::Client {
    let (host, port) = sqs_endpoint();
    let conf = aws_sdk_sqs::Config::builder()
        .behavior_version(aws_sdk_sqs::config::BehaviorVersion::latest())
        .region(aws_sdk_sqs::config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_sqs::config::Credentials::new(
            "testing", "testing", None, None, "test",
        ))
        .endpoint_url(format!("http://{host}:{port}"))
        .build();
    aws_sdk_sqs::Client::from_conf(conf)
}

/// (ApproximateNumberOfMessages, ApproximateNumberOfMessagesNotVisible) of an SQS queue.
pub async fn sqs_attributes(sqs_name: &str) -> (u64, u64) {
    use aws_sdk_sqs::types::QueueAttributeName as A;
    let client = raw_sqs().await;
    let url = client
        .get_queue_url()
        .queue_name(sqs_name)
        .send()
        .await
        .unwrap();
    let out = client
        .get_queue_attributes()
        .queue_url(url.queue_url().unwrap())
        .attribute_names(A::ApproximateNumberOfMessages)
        .attribute_names(A::ApproximateNumberOfMessagesNotVisible)
        .send()
        .await
        .unwrap();
    let a = out.attributes().unwrap();
    (
        a[&A::ApproximateNumberOfMessages].parse().unwrap(),
        a[&A::ApproximateNumberOfMessagesNotVisible]
            .parse()
            .unwrap(),
    )
}

/// A moto SQS server of the test's own, on a free port; it can be killed and started again on
/// the same port (moto keeps no state across a restart: queues must be created again).
pub struct OwnMoto {
    pub port: u16,
    child: Option<ChildGuard>,
}

impl OwnMoto {
    pub fn start() -> OwnMoto {
        let mut m = OwnMoto {
            port: free_port(),
            child: None,
        };
        m.restart();
        m
    }

    fn binary() -> PathBuf {
        let beside_python = python().with_file_name("moto_server");
        if beside_python.is_file() {
            beside_python
        } else {
            which("moto_server")
        }
    }

    /// Kills the server with SIGKILL.
    pub fn kill(&mut self) {
        self.child = None;
    }

    /// Kills the server if it runs, starts a new one on the same port, waits until it listens.
    pub fn restart(&mut self) {
        self.kill();
        let child = Command::new(Self::binary())
            .args(["-H", "127.0.0.1", "-p", &self.port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server starts");
        self.child = Some(ChildGuard(child));
        wait_listening(self.port, "moto_server", Duration::from_secs(60));
    }

    /// `sqs://testing:testing@127.0.0.1:<port>`, as kombu spells a local endpoint.
    pub fn broker_url(&self) -> String {
        format!("sqs://testing:testing@127.0.0.1:{}", self.port)
    }

    /// Creates an SQS queue from another process (boto3 from the Celery virtualenv), so that no
    /// connection of the test process stays open to the server.
    pub fn create_queue(&self, sqs_name: &str) {
        let script = "import sys, boto3\n\
            c = boto3.client('sqs', endpoint_url=sys.argv[1], region_name='us-east-1',\n\
                aws_access_key_id='testing', aws_secret_access_key='testing')\n\
            c.create_queue(QueueName=sys.argv[2])\n";
        let out = Command::new(python())
            .args(["-c", script])
            .arg(format!("http://127.0.0.1:{}", self.port))
            .arg(sqs_name)
            .output()
            .expect("python runs");
        assert!(
            out.status.success(),
            "create_queue {sqs_name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Runs a Python `script` (boto3 from the Celery virtualenv) against the suite's moto server,
/// whose endpoint is its first argument, then `args`; returns its standard output, trimmed.
pub fn boto3_on_suite_moto(script: &str, args: &[&str]) -> String {
    let (host, port) = sqs_endpoint();
    let out = Command::new(python())
        .args(["-c", script])
        .arg(format!("http://{host}:{port}"))
        .args(args)
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "boto3 script failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Keys of a role assumed in AWS account `account` on the suite's moto server: moto acts in that
/// account for every request signed with them (its multi-account support), so a queue created
/// with them exists for them only.
pub fn other_account_keys(account: &str) -> (String, String) {
    let script = "import sys, boto3\n\
        sts = boto3.client('sts', endpoint_url=sys.argv[1], region_name='us-east-1',\n\
            aws_access_key_id='testing', aws_secret_access_key='testing')\n\
        c = sts.assume_role(RoleArn='arn:aws:iam::%s:role/cks' % sys.argv[2],\n\
            RoleSessionName='cks')['Credentials']\n\
        print(c['AccessKeyId'], c['SecretAccessKey'])\n";
    let out = boto3_on_suite_moto(script, &[account]);
    let (id, secret) = out.split_once(' ').expect("two keys");
    (id.to_string(), secret.to_string())
}

/// Creates SQS queue `name` on the suite's moto server (FIFO, with content-based deduplication,
/// when the name ends in `.fifo`), signed with `keys` (default `testing`); returns its URL.
pub fn create_sqs_queue(name: &str, keys: Option<(&str, &str)>) -> String {
    let (id, secret) = keys.unwrap_or(("testing", "testing"));
    let script = "import sys, boto3\n\
        c = boto3.client('sqs', endpoint_url=sys.argv[1], region_name='us-east-1',\n\
            aws_access_key_id=sys.argv[3], aws_secret_access_key=sys.argv[4])\n\
        attrs = {'FifoQueue': 'true', 'ContentBasedDeduplication': 'true'} \\\n\
            if sys.argv[2].endswith('.fifo') else {}\n\
        print(c.create_queue(QueueName=sys.argv[2], Attributes=attrs)['QueueUrl'])\n";
    boto3_on_suite_moto(script, &[name, id, secret])
}

/// (ApproximateNumberOfMessages, ApproximateNumberOfMessagesNotVisible) of the queue at `url`,
/// read with `keys`; `None` when the server refuses (no such queue for those keys).
pub fn sqs_attributes_at(url: &str, keys: (&str, &str)) -> Option<(u64, u64)> {
    let script = r#"
import sys, boto3
c = boto3.client('sqs', endpoint_url=sys.argv[1], region_name='us-east-1',
    aws_access_key_id=sys.argv[3], aws_secret_access_key=sys.argv[4])
try:
    a = c.get_queue_attributes(QueueUrl=sys.argv[2], AttributeNames=['All'])['Attributes']
    print(a['ApproximateNumberOfMessages'], a['ApproximateNumberOfMessagesNotVisible'])
except c.exceptions.QueueDoesNotExist:
    print('missing')
"#;
    let out = boto3_on_suite_moto(script, &[url, keys.0, keys.1]);
    let (a, b) = out.split_once(' ')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}
