//! Android only: the JNI entry point of `dev.herald.sdk.HeraldAndroid.init(context)`
//! (android-sample/herald), which gives the SDK's TLS verifier the JVM and the app's
//! Context (`herald_sdk::tls::android::init`). The verifier asks an Android
//! `X509TrustManager` over the device's CA store (system, user- and MDM-installed CAs)
//! about each server certificate, through the Kotlin classes of
//! `org.rustls:rustls-platform-verifier`, loaded with the Context's class loader.
//! Everything else of the binding goes through UniFFI/JNA; this one call needs a real
//! JNI `JNIEnv`, which JNA does not give.

use jni::errors::ThrowRuntimeExAndDefault;
use jni::objects::{JClass, JObject};
use jni::EnvUnowned;

/// `private external fun nativeInit(context: Context)` of the Kotlin object
/// `dev.herald.sdk.HeraldAndroid` (a `@JvmStatic` method, hence the class argument).
/// A failure throws a `RuntimeException` in Kotlin; a panic cannot cross into the JVM
/// (`with_env` catches it and it is thrown the same way).
#[unsafe(no_mangle)]
pub extern "system" fn Java_dev_herald_sdk_HeraldAndroid_nativeInit<'caller>(
    mut env: EnvUnowned<'caller>,
    _class: JClass<'caller>,
    context: JObject<'caller>,
) {
    env.with_env(|env| -> Result<(), jni::errors::Error> {
        herald_sdk::tls::android::init(env, context)
    })
    .resolve::<ThrowRuntimeExAndDefault>()
}
